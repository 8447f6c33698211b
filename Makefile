# Two entry points on a fresh machine (each creates or refreshes .venv/ first):
#   make demo   quantize the default model (W4, groups of 64), evaluate it against the float model
#   make test   lint, then the test suite (unit tests + the CI subset of real-model tests)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lowbit-installed
PYTEST := $(BIN)/python -m pytest

.PHONY: demo test test-slow lint bench clean

# The CPU wheel of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile src/lowbit/kernels/csrc/affine_gemv.cpp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m lowbit.kernels.build
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit quantize smollm2-135m --recipe w4-rtn-g64 --out out/smollm2-135m-w4-rtn-g64 \
		--overwrite --eval --eval-corpus wiki --eval-seqlen 2048 --eval-tokens 16384
	$(BIN)/lowbit inspect out/smollm2-135m-w4-rtn-g64 | head -n 5

test: $(STAMP) lint
	$(PYTEST) -m "not slow or smoke"

test-slow: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/rtn_table.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

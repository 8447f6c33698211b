# Two entry points on a fresh machine (each creates or refreshes .venv/ first):
#   make demo   quantize the default model (W4, groups of 64), evaluate it against the float model
#   make test   lint, then the test suite (unit tests + the CI subset of real-model tests)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lowbit-installed
PYTEST := $(BIN)/python -m pytest

.PHONY: demo test test-slow lint bench report report-speed report-image clean

# The CPU wheel of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile src/lowbit/kernels/build.py $(wildcard src/lowbit/kernels/csrc/*.cpp src/lowbit/kernels/csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,export,serve,litert,image]"
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

# The comparison reports in docs/ (speed figures need a quiet machine: minutes, both cores).
REPORT_VARIANTS := fp32 bf16 w8a8-dynamic w4-rtn-g64 w4-g64-head16 w4-g64-head8 w4-g64-down8
report: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lowbit report smollm2-135m --variants $(REPORT_VARIANTS) \
		--out out/report-smollm2 --overwrite
	mkdir -p docs/report-smollm2 && cp out/report-smollm2/report.* out/report-smollm2/*.png docs/report-smollm2/

report-speed: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/lowbit report tinyllama-1.1b-random --no-quality \
		--variants fp32 bf16 w8a8-dynamic w4-rtn-g64 w4-g64-head16 w4-g64-head8 --out out/report-tinyllama --overwrite
	mkdir -p docs/report-tinyllama && cp out/report-tinyllama/report.* out/report-tinyllama/*.png docs/report-tinyllama/

report-image: $(STAMP)
	$(BIN)/lowbit report waifu2x-upconv7 --out out/report-waifu2x --overwrite
	mkdir -p docs/report-waifu2x && cp out/report-waifu2x/report.* out/report-waifu2x/*.png docs/report-waifu2x/

clean:
	rm -rf $(VENV) .venv-peers out .pytest_cache .ruff_cache

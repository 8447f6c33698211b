"""Shared fixtures: tiny random HF models with a real tokenizer, and an isolated cache.

Unit tests never touch the user's cache (LOWBIT_CACHE points at a temporary folder); tests
marked ``slow`` use the real cache so the default model is downloaded once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SMALL_IMAGE, TEXT, make_tokenizer, tiny_llama


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, tmp_path_factory, monkeypatch) -> None:
    if request.node.get_closest_marker("slow") is None:
        from lowbit.kernels.build import build_dir

        # the compiled kernels are shared (child processes would rebuild them, ~40 s each)
        monkeypatch.setenv("LOWBIT_KERNEL_DIR", str(build_dir().parent))
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same random numbers on every run (no flaky tolerances)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(vocab=len(tokenizer))


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_model, tokenizer) -> Path:
    """A saved HF folder (config, safetensors, tokenizer) of a tiny random Llama."""
    folder = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def small_sr(monkeypatch):
    """waifu2x-upconv7's architecture with random weights (a builder), evaluated on the small
    input ``helpers.SMALL_IMAGE``."""
    import torch

    from lowbit.models.images.waifu2x import UpConv7

    def build() -> UpConv7:
        torch.manual_seed(0)
        return UpConv7().eval()

    monkeypatch.setattr("lowbit.models.images.sr_evaluation", lambda: (SMALL_IMAGE, None))
    return build

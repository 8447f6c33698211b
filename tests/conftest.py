"""Shared fixtures: tiny random HF models with a real tokenizer, and an isolated cache.

Unit tests never touch the user's cache (LOWBIT_CACHE points at a temporary folder); tests
marked ``slow`` use the real cache so the default model is downloaded once.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

TEXT = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "all that glitters is not gold . the early bird catches the worm . "
) * 40


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, tmp_path_factory, monkeypatch) -> None:
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def make_tokenizer():
    """A word-level tokenizer over a small vocabulary (real `tokenizers` object)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split())) + list(string.ascii_lowercase)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_llama(vocab: int = 64, layers: int = 2, hidden: int = 64, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


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

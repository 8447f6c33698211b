"""Whether the compact forward (:class:`lowbit.runtime.llama.LlamaForward`) computes what a
decoder of a family it does not name computes: checked once per model on a tiny random twin
(:mod:`lowbit.models.twin`: the model's own transformers class and config at width
64, float64), whose logits from the compact forward (a prompt, then two decode steps, which
run other code) must equal its own forward's.

Many decoders are Llama's arithmetic under another name (InternLM3, Helium, EXAONE, Seed-OSS
and the like): they get the compact loop's speed. One that adds anything (Granite's
multipliers, an MLP without a gate, layers without RoPE) differs on the twin and keeps the
model's own forward. The twin sees 12 tokens, so the settings that matter only at longer
contexts (sliding windows, RoPE scaling) stay with :func:`lowbit.runtime.llama.capacity_reason`,
and a RoPE setting that acts beyond the cos/sin table (which the compact forward takes from the
model's own rotary module) is refused by name: Ministral 3's ``llama_4_scaling_beta`` scales the
queries only past ``original_max_position_embeddings`` (16,384) tokens, where no twin looks.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.experts import experts_to_linears
from lowbit.models.rotate_fit import ATTENTION, MLP
from lowbit.models.twin import tiny_twin, twin_ids, twin_logits
from lowbit.runtime.llama import (
    FAMILIES,
    LlamaForward,
    capacity_reason,
    is_mixture,
    is_post_norm,
)

TOLERANCE = 1e-4  # relative max difference of the twin's logits (its RoPE table is float32)
PARTS = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")
# what transformers' rotary modules read to build the cos/sin table (every RoPE kind)
ROPE_TABLE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                   "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                   "attention_factor", "mscale", "mscale_all_dim", "short_factor", "long_factor",
                   "truncate", "partial_rotary_factor", "max_position_embeddings"}  # fmt: skip
GATED_MLP = MLP[:2]  # the compact forward's SiLU·up takes gate and up (apart or fused)
QKV = ATTENTION[:2]  # q/k/v apart or fused (not a latent attention's)
# a pre-norm block's norms, or a post-norm one's (OLMo 2: the outputs of attention and MLP)
BLOCK_PARTS = ("post_attention_layernorm", "self_attn.o_proj")
INPUT_NORMS = ("input_layernorm", "post_feedforward_layernorm")


def unsupported_reason(model: nn.Module, capacity: int) -> str | None:
    """Why the compact forward cannot run ``model`` up to ``capacity`` tokens, or None when it
    can (:class:`lowbit.runtime.generate.Runtime` keeps the family's part once per model)."""
    return family_reason(model) or capacity_reason(model, capacity)


def family_reason(model: nn.Module) -> str | None:
    """None when the compact forward computes ``model``'s function (a family it names, or one
    whose twin agrees); else why not, for the log line of the fallback."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    held = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and not isinstance(getattr(m, "weight", None), torch.Tensor)), None)  # fmt: skip
    if held is not None:  # e.g. a compressed-tensors folder, as transformers runs it
        return f"its layer {held} holds no weight tensor (kept compressed by its loader)"
    if kind in FAMILIES:
        return None
    why = parts_missing(model)
    if why:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}, and {why}"
    rope = getattr(model.config, "rope_parameters", None) or {}
    beyond = sorted(set(rope) - ROPE_TABLE_KEYS)
    if beyond:
        return (f"model type {kind!r}: its RoPE settings {', '.join(beyond)} act beyond the "
                f"cos/sin table")  # fmt: skip
    try:
        twin = tiny_twin(model)
        experts_to_linears(twin)  # a mixture's experts as the model holds them
        expected = twin_logits(twin)  # (2, 12, vocab)
        forward, ids = LlamaForward(twin), twin_ids()
        with torch.no_grad():  # a prompt of 10, then 2 decode steps (each path its own code)
            cache = forward.new_cache(2, 12)
            got = [forward(ids[:, :10], cache, all_logits=True)]
            got += [forward(ids[:, i : i + 1], cache).unsqueeze(1) for i in (10, 11)]
            got = torch.cat(got, dim=1)
    except Exception as exc:  # whatever fails, the model keeps its own forward
        return (f"model type {kind!r}: the compact forward could not be checked on a small "
                f"model of it ({exc})")  # fmt: skip
    change = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    if change > TOLERANCE:
        return (f"model type {kind!r} computes more than a Llama (the compact forward's logits "
                f"differ by {change:.1e} on a small model of it)")  # fmt: skip
    return None


def post_norm(model: nn.Module) -> bool:
    """Whether ``model``'s blocks are post-norm (OLMo 2's: no input norm, the sublayers'
    outputs normed): the compact forward runs them, graphs written as Llama's pre-norm blocks
    (the GGUF ``llama`` architecture, LiteRT's cached steps) do not."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return any(is_post_norm(block) for block in layers)


def parts_missing(model: nn.Module) -> str:
    """What of a Llama's layout ``model`` lacks (or "")."""
    names = {n for n, _ in model.named_modules()}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(p in names for p in PARTS):
        return "it is not laid out as a Llama (model.layers, embed_tokens, norm, rotary_emb)"
    for block in layers:
        inner = {n for n, _ in block.named_modules()}
        qkv = any(all(f"self_attn.{n}" in inner for n in g) for g in QKV)
        mlp = getattr(block, "mlp", None)  # a gated MLP, or a mixture (called as it is)
        gate_up = "mlp.down_proj" in inner and any(
            all(f"mlp.{n}" in inner for n in g) for g in GATED_MLP)  # fmt: skip
        mixture = isinstance(mlp, nn.Module) and is_mixture(mlp)
        norms = all(p in inner for p in BLOCK_PARTS) and any(p in inner for p in INPUT_NORMS)
        if not (qkv and (gate_up or mixture) and norms):
            return "its blocks lack a Llama block's norms and projections"
    return ""

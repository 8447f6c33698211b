"""Quantized attention inputs in a transformers model: the key/value cache and the queries
rounded as :class:`~lowbit.formats.spec.AttentionSpec` says, through the model's own forward.

transformers routes every attention layer of its modern families through a registered
attention function (``AttentionInterface``). lowbit registers one, ``"lowbit"``, that rounds
the keys and values it is given (the whole cache, after RoPE: rounding is idempotent, so a
token's key reads the same at every step) and the queries, then calls PyTorch's SDPA path.
Each layer's spec is an attribute of its attention module, so one process can hold models
with different settings. :mod:`lowbit.runtime` stores the same codes in its cache instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import AttentionSpec
from lowbit.primitives.hadamard import hadamard
from lowbit.primitives.kv import fake_quantize_heads

NAME = "lowbit"  # the attention implementation's registered name
ATTRIBUTE = "lowbit_attention"  # where an attention module keeps its AttentionSpec


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the model's attention function (they hold ``layer_idx`` and the
    config that names the implementation)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")
            and hasattr(m, "head_dim")]  # fmt: skip


def install_attention(model: nn.Module, spec: AttentionSpec) -> int:
    """Round ``model``'s attention inputs as ``spec`` says; returns the layers changed."""
    use_attention_function(model)
    return set_attention(model, spec)


def use_attention_function(model: nn.Module) -> None:
    """Route ``model``'s attention through lowbit's function (a layer without a spec runs
    PyTorch's SDPA as before)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if not attention_modules(model) or getattr(model, "config", None) is None:
        raise LowbitError("attention: a quantized key/value cache needs a transformers model "
                          "whose attention layers call its attention functions")  # fmt: skip
    AttentionInterface.register(NAME, quantized_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def set_attention(module: nn.Module, spec: AttentionSpec) -> int:
    """Give every attention layer inside ``module`` the spec; returns how many."""
    layers = attention_modules(module)
    for layer in layers:
        spec.group(layer.head_dim)  # a group size that does not divide the head is an error
        setattr(layer, ATTRIBUTE, spec)
    return len(layers)


def head_rotation(spec: AttentionSpec, head_dim: int, like: Tensor) -> Tensor | None:
    """The orthonormal Hadamard matrix applied to every head when ``spec.hadamard``."""
    return hadamard(head_dim, like.dtype).to(like.device) if spec.hadamard else None


def round_queries(spec: AttentionSpec, q: Tensor) -> Tensor:
    """Queries (..., D) rounded when ``spec.query_bits`` asks for it."""
    if spec.query_bits is None:
        return q
    return fake_quantize_heads(q, spec.query_bits, spec.group(q.shape[-1]))


def round_qkv(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, h: Tensor | None,
              keys_values: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(queries, keys, values) (..., D) rotated by ``h`` (when given) and rounded; without
    ``keys_values`` the keys and values are left to a cache that stores their codes."""
    if h is not None:
        q, k, v = q @ h, k @ h, v @ h
    if spec.kv_bits is not None and keys_values:
        group = spec.group(k.shape[-1])
        k, v = (fake_quantize_heads(x, spec.kv_bits, group) for x in (k, v))
    return round_queries(spec, q), k, v


def quantized_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, **kwargs: Any,
) -> tuple[Tensor, Any]:  # fmt: skip
    """transformers' attention-function signature: (B, H, T, D) inputs, (B, T, H, D) output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spec: AttentionSpec | None = getattr(module, ATTRIBUTE, None)
    if spec is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    h = head_rotation(spec, query.shape[-1], query)
    query, key, value = round_qkv(spec, query, key, value, h)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if h is not None:
        out = out @ h.T
    return out, weights


def attention_spec(manifest: dict | None) -> AttentionSpec | None:
    """The AttentionSpec a lowbit manifest's recipe holds, or None."""
    recipe = (manifest or {}).get("recipe") or {}
    data = recipe.get("attention")
    return None if data is None else AttentionSpec.from_dict(data, "manifest recipe.attention")

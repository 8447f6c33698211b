"""Quantized attention inputs in a transformers model: the key/value cache and the queries
rounded as :class:`~lowbit.formats.spec.AttentionSpec` says, through the model's own forward.

transformers routes every attention layer of its modern families through a registered
attention function (``AttentionInterface``). lowbit registers one, ``"lowbit"``, that rounds
the keys and values it is given (the whole cache, after RoPE: rounding is idempotent, so a
token's key reads the same at every step) and the queries, then calls PyTorch's SDPA path.
Each layer's spec is an attribute of its attention module, so one process can hold models
with different settings. :mod:`lowbit.runtime` stores the same codes in its cache instead.

With ``center_keys`` each attention module also holds a buffer ``lowbit_key_center``
(key heads, head dim): the mean of its keys (after RoPE) on the calibration text, subtracted
before rounding. It is measured once (:func:`calibrate_key_centers`) and saved with the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import AttentionSpec
from lowbit.primitives.hadamard import hadamard, has_hadamard
from lowbit.primitives.kv import cache_values, fake_quantize_heads

NAME = "lowbit"  # the attention implementation's registered name
ATTRIBUTE = "lowbit_attention"  # where an attention module keeps its AttentionSpec
CENTER = "lowbit_key_center"  # the buffer holding a layer's key centres (center_keys)
OBSERVER = "lowbit_key_observer"  # set while the key centres are measured


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

    _check_routable(model)
    AttentionInterface.register(NAME, quantized_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def check_attention(model: nn.Module, spec: AttentionSpec) -> None:
    """What :func:`install_attention` would refuse, without changing ``model`` (a skeleton
    will do): checked before a run's work (a learned rotation trains first)."""
    _check_routable(model)
    for layer in attention_modules(model):
        _check_head(spec, layer.head_dim)


def _check_routable(model: nn.Module) -> None:
    if not attention_modules(model) or getattr(model, "config", None) is None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LowbitError(f"attention: a quantized key/value cache needs a transformers model "
                          f"whose attention layers call its attention functions; {kind}'s do "
                          f"not (or it has no attention): drop --kv-bits and the recipe's "
                          f"attention block for this model")  # fmt: skip
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None):  # Gemma 2's, which SDPA cannot do
        raise LowbitError(f"attention: {config.model_type} caps its attention logits "
                          f"(attn_logit_softcapping), which lowbit's rounded attention does not "
                          f"do yet; drop --kv-bits / --kv-hadamard and the recipe's attention "
                          f"block for this model")  # fmt: skip


def set_attention(module: nn.Module, spec: AttentionSpec) -> int:
    """Give every attention layer inside ``module`` the spec; returns how many."""
    layers = attention_modules(module)
    for layer in layers:
        _check_head(spec, layer.head_dim)
        setattr(layer, ATTRIBUTE, spec)
    return len(layers)


def _check_head(spec: AttentionSpec, head_dim: int) -> None:
    spec.group(head_dim)  # a group size that does not divide the head is an error
    if spec.hadamard and not has_hadamard(head_dim):
        raise LowbitError(f"attention.hadamard: no Hadamard matrix of the head size {head_dim} "
                          f"can be built here; drop --kv-hadamard (hadamard: false)")  # fmt: skip


def head_rotation(spec: AttentionSpec, head_dim: int, like: Tensor) -> Tensor | None:
    """The orthonormal Hadamard matrix applied to every head when ``spec.hadamard``."""
    return hadamard(head_dim, like.dtype).to(like.device) if spec.hadamard else None


def round_queries(spec: AttentionSpec, q: Tensor) -> Tensor:
    """Queries (..., D) rounded when ``spec.query_bits`` asks for it."""
    if spec.query_bits is None:
        return q
    return fake_quantize_heads(q, spec.query_bits, spec.group(q.shape[-1]))


def round_qkv(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, h: Tensor | None,
              center: Tensor | None = None, keys_values: bool = True,
              ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(queries, keys, values) (B, H, T, D) with the keys minus ``center`` (Hkv, D) when given,
    rotated by ``h`` (when given) and rounded; without ``keys_values`` the keys and values are
    left to a cache that stores their codes."""
    if center is not None:
        k = k - center.to(device=k.device, dtype=k.dtype).unsqueeze(-2)
    if h is not None:
        q, k, v = q @ h, k @ h, v @ h
    if spec.float16 and keys_values:  # what a float16 cache holds, read back
        k, v = (cache_values(x, torch.float16).to(x.dtype) for x in (k, v))
    elif spec.kv_bits is not None and keys_values:
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
    observer = getattr(module, OBSERVER, None)
    if observer is not None:  # measuring the key centres: the keys as they arrive, unrounded
        observer(key)
    if spec is None or observer is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    h = head_rotation(spec, query.shape[-1], query)
    query, key, value = round_qkv(spec, query, key, value, h, key_center(module, spec))
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if h is not None:
        out = out @ h.T
    return out, weights


def key_center(module: nn.Module, spec: AttentionSpec) -> Tensor | None:
    """The layer's key centres (Hkv, D) when ``spec.center_keys`` (None otherwise)."""
    if not spec.center_keys:
        return None
    center = getattr(module, CENTER, None)
    if center is None:
        raise LowbitError("attention.center_keys: this model's key centres were never "
                          "measured; quantize it with calibration text (--calib)")  # fmt: skip
    return center


@torch.no_grad()
def calibrate_key_centers(
    layers: list[nn.Module], run: Callable[[], None], sum_over: Callable[[Tensor], Tensor]
) -> None:
    """Set each attention module's key centres to the mean of the keys it sees while ``run``
    drives forward passes; ``sum_over`` adds a tensor over the process group (identity for one
    process), so every rank gets the centres of all ranks' batches."""
    sums: dict[int, list[Tensor]] = {}

    def observer_for(i: int) -> Callable[[Tensor], None]:
        def observe(key: Tensor) -> None:  # (B, Hkv, T, D)
            total = key.detach().double().sum((0, 2))
            count = torch.tensor(float(key.shape[0] * key.shape[2]), dtype=torch.float64)
            if i in sums:
                total, count = total + sums[i][0], count + sums[i][1]
            sums[i] = [total, count]

        return observe

    for i, layer in enumerate(layers):
        setattr(layer, OBSERVER, observer_for(i))
    try:
        run()
    finally:
        for layer in layers:
            delattr(layer, OBSERVER)
    for i, layer in enumerate(layers):
        if i not in sums:
            raise LowbitError("attention.center_keys: a layer saw no calibration keys")
        total, count = sum_over(sums[i][0]), sum_over(sums[i][1])
        layer.register_buffer(CENTER, (total / count).float())


def add_key_centers(model: nn.Module) -> None:
    """Give every attention layer an (unmeasured, zero) key-centre buffer: the skeleton a
    saved model's centres load into."""
    for layer in attention_modules(model):
        cfg = layer.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        layer.register_buffer(CENTER, torch.zeros(kv_heads, layer.head_dim))


def has_key_centers(model: nn.Module) -> bool:
    """Whether every attention layer of ``model`` holds measured key centres."""
    layers = attention_modules(model)
    return bool(layers) and all(CENTER in layer._buffers for layer in layers)


def drop_key_centers(model: nn.Module) -> None:
    """Remove the key-centre buffers (an exported file holds the weights only)."""
    for layer in attention_modules(model):
        if CENTER in layer._buffers:
            del layer._buffers[CENTER]


def attention_spec(manifest: dict | None) -> AttentionSpec | None:
    """The AttentionSpec a lowbit manifest's recipe holds, or None."""
    recipe = (manifest or {}).get("recipe") or {}
    data = recipe.get("attention")
    return None if data is None else AttentionSpec.from_dict(data, "manifest recipe.attention")

"""Rounding of attention's inputs (keys, values, queries): per token and head, groups of
channels along the head dimension, asymmetric, float16 scale and minimum (pure functions);
and a float16 cache's rounding (:func:`cache_values`).

The cache stores ``(codes, scale, minimum)``; :func:`fake_quantize_heads` is the same rounding
without the storage, for evaluation through a model's own attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.qtype import qtype_for
from lowbit.primitives.qparams import Grid, QParams, choose_qparams, dequantize, quantize

F16_MAX = 65504.0  # the largest finite float16


def cache_values(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x as a float cache of ``dtype`` stores it: a float16 cache (``kv_bits`` 16) clamps to
    float16's range first (a key beyond ±65504 is stored as the largest float16, not as
    infinity; NaN stays NaN), then rounds to nearest even; other dtypes are a plain cast."""
    if dtype == torch.float16 and x.dtype != dtype:
        x = x.clamp(-F16_MAX, F16_MAX)
    return x.to(dtype)


def _grid(bits: int) -> Grid:
    return Grid(qtype_for("int", bits), symmetric=False, zero_point="float",
                scale_dtype=torch.float16)  # fmt: skip


def quantize_heads(x: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., D) -> codes (..., D) uint8, scale and minimum (..., D / group) float16."""
    xb = x.float().unflatten(-1, (-1, group))  # (..., G, g)
    grid = _grid(bits)
    qp = choose_qparams(xb.amin(-1), xb.amax(-1), grid)
    return quantize(xb, qp, grid).flatten(-2), qp.scale, qp.zero


def dequantize_heads(codes: Tensor, scale: Tensor, minimum: Tensor, bits: int) -> Tensor:
    """The float32 values of :func:`quantize_heads`' output."""
    group = codes.shape[-1] // scale.shape[-1]
    cb = codes.unflatten(-1, (-1, group))
    return dequantize(cb, QParams(scale, minimum), _grid(bits)).flatten(-2)


def encode_heads(x: Tensor, bits: int, group: int) -> list[Tensor]:
    """What a cache of codes stores for x (..., D): codes (two per byte up to 4 bits), float16
    scale and minimum per group."""
    codes, scale, minimum = quantize_heads(x, bits, group)
    return [pack_nibbles(codes) if bits <= 4 else codes, scale, minimum]


def decode_heads(codes: Tensor, scale: Tensor, minimum: Tensor, bits: int) -> Tensor:
    """The float32 values :func:`encode_heads` stored."""
    return dequantize_heads(unpack_nibbles(codes) if bits <= 4 else codes, scale, minimum, bits)


def pack_nibbles(codes: Tensor) -> Tensor:
    """Codes below 16 (..., D), D even -> (..., D / 2) bytes, channel 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def fake_quantize_heads(x: Tensor, bits: int, group: int) -> Tensor:
    """Round ``x`` (..., D) as the cache stores it; same dtype back."""
    return dequantize_heads(*quantize_heads(x, bits, group), bits).to(x.dtype)

"""Attention of one new token per row over one layer's key/value cache of codes
(``csrc/decode_codes.cpp``), and its plain-PyTorch reference, which defines the result.

The cache layout is :class:`lowbit.runtime.kv_cache.QuantKVCache`'s: per slot, head and group of
channels an unsigned code, a float16 scale and a float16 minimum (value = code · scale +
minimum), codes of up to 4 bits two per byte (low nibble first). The heads are prepared as
lowbit's attention function prepares them (:func:`lowbit.nn.attention.round_qkv`): per-head
norms, RoPE, key centres, the turn of every head by an orthonormal matrix, rounded queries.
Both paths store the new token's key and value as :func:`lowbit.primitives.kv.encode_heads`
does; then the native op reads the codes as they are, the reference dequantizes the filled
slots and calls SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops
from lowbit.kernels.decode import rms_norm_reference, rotate
from lowbit.primitives.kv import decode_heads, encode_heads, fake_quantize_heads


def decode_attention_codes_reference(
    qkv: Tensor, k_codes: Tensor, k_scale: Tensor, k_min: Tensor, v_codes: Tensor,
    v_scale: Tensor, v_min: Tensor, cos: Tensor, sin: Tensor, pad: Tensor, pos: int, heads: int,
    kv_heads: int, scale: float, q_norm: Tensor, k_norm: Tensor, eps: float, center: Tensor,
    rotation: Tensor, bits: int, query_bits: int,
) -> Tensor:  # fmt: skip
    """See :func:`decode_attention_codes`."""
    b, dim = qkv.shape[0], cos.shape[-1]
    group, end = dim // k_scale.shape[-1], pos + 1
    q, k, v = qkv.view(b, -1, 1, dim).split([heads, kv_heads, kv_heads], dim=1)  # (B, n, 1, D)
    if q_norm.numel():
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    p = (pos - pad).clamp_min(0)  # (B,) positions skip the left padding
    c, s = cos[p][:, None, None], sin[p][:, None, None]  # (B, 1, 1, D)
    q, k = rotate(q, c, s), rotate(k, c, s)
    if center.numel():
        k = k - center.unsqueeze(-2)
    if rotation.numel():
        q, k, v = q @ rotation, k @ rotation, v @ rotation
    if query_bits:
        q = fake_quantize_heads(q, query_bits, group)
    sides = [(k, (k_codes, k_scale, k_min)), (v, (v_codes, v_scale, v_min))]
    for x, stored in sides:
        for target, value in zip(stored, encode_heads(x, bits, group), strict=True):
            target[:, :, pos : pos + 1] = value
    keys, vals = (decode_heads(*(t[:, :, :end] for t in stored), bits) for _, stored in sides)
    real = torch.arange(end, device=q.device).unsqueeze(0) >= pad.unsqueeze(1)  # (B, S)
    a = F.scaled_dot_product_attention(
        q, keys, vals, attn_mask=real[:, None, None], scale=scale, enable_gqa=True
    )  # (B, H, 1, D)
    if rotation.numel():
        a = a @ rotation.T
    return a.reshape(b, -1)


def decode_attention_codes(
    qkv: Tensor, k_codes: Tensor, k_scale: Tensor, k_min: Tensor, v_codes: Tensor,
    v_scale: Tensor, v_min: Tensor, cos: Tensor, sin: Tensor, pad: Tensor, pos: int, heads: int,
    kv_heads: int, scale: float, q_norm: Tensor, k_norm: Tensor, eps: float, center: Tensor,
    rotation: Tensor, bits: int, query_bits: int,
) -> Tensor:  # fmt: skip
    """One decode step's attention over one layer's cache of codes. qkv (B, (H + 2·Hkv)·D) as
    the projections give it; the cache: codes (B, Hkv, T, D/2 up to 4 bits, else D) uint8,
    scales and minimums (B, Hkv, T, D/group) float16, keys' then values'; cos/sin (T, D)
    tables by position; ``pad`` (B,) left-padding slots per row. Optional (empty when not):
    per-head norms ``q_norm``/``k_norm`` (D), key centres ``center`` (Hkv, D) subtracted after
    RoPE, ``rotation`` (D, D) turning every head (the output is turned back); ``query_bits``
    rounds the queries (0: not). The key and value are rounded into slot ``pos``; row b
    attends to slots pad[b]..pos. Returns (B, H·D)."""
    args = (qkv, k_codes, k_scale, k_min, v_codes, v_scale, v_min, cos, sin, pad, pos, heads,
            kv_heads, scale, q_norm, k_norm, eps, center, rotation, bits, query_bits)  # fmt: skip
    tensors = [t for t in args if isinstance(t, Tensor)]
    floats = (qkv, cos, sin, q_norm, k_norm, center, rotation)
    native = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and all(
        t.dtype == torch.float32 for t in floats
    )
    if native and native_ops():
        return torch.ops.lowbit_cpu.decode_attention_codes(*args)
    return decode_attention_codes_reference(*args)

"""Attention of one new token per row over a key/value cache of codes
(``csrc/decode_codes.cpp``), and its plain-PyTorch reference, which defines the result.

The cache layout is :class:`lowbit.runtime.kv_cache.QuantKVCache`'s: per slot, head and group of
channels an unsigned code, a float16 scale and a float16 minimum (value = code · scale +
minimum), codes of up to 4 bits two per byte (low nibble first). Both store the new token's key
and value as :func:`lowbit.primitives.kv.encode_heads` does (the same codes); then the native
op reads the codes as they are, the reference dequantizes the filled slots and calls SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops
from lowbit.primitives.kv import decode_heads, encode_heads


def attend_codes_reference(
    q: Tensor, k: Tensor, v: Tensor, k_codes: Tensor, k_scale: Tensor, k_min: Tensor,
    v_codes: Tensor, v_scale: Tensor, v_min: Tensor, pad: Tensor, pos: int, bits: int,
    scale: float,
) -> Tensor:  # fmt: skip
    """See :func:`attend_codes`."""
    group, end = q.shape[-1] // k_scale.shape[-1], pos + 1
    sides = [(k, (k_codes, k_scale, k_min)), (v, (v_codes, v_scale, v_min))]
    for x, stored in sides:
        for target, value in zip(stored, encode_heads(x, bits, group), strict=True):
            target[:, :, pos] = value
    keys, vals = (decode_heads(*(t[:, :, :end] for t in stored), bits) for _, stored in sides)
    real = torch.arange(end, device=q.device).unsqueeze(0) >= pad.unsqueeze(1)  # (B, S)
    a = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, vals, attn_mask=real[:, None, None], scale=scale, enable_gqa=True
    )  # (B, H, 1, D)
    return a.squeeze(2)


def attend_codes(
    q: Tensor, k: Tensor, v: Tensor, k_codes: Tensor, k_scale: Tensor, k_min: Tensor,
    v_codes: Tensor, v_scale: Tensor, v_min: Tensor, pad: Tensor, pos: int, bits: int,
    scale: float,
) -> Tensor:  # fmt: skip
    """One decode step's attention over one layer's cache of codes. q (B, H, D), k and v
    (B, Hkv, D) float32: the new token's queries, key and value as attention reads them (after
    RoPE and any rotation); the cache: codes (B, Hkv, T, D/2 up to 4 bits, else D) uint8,
    scales and minimums (B, Hkv, T, D/group) float16, keys' then values'. The key and value are
    rounded into slot ``pos``; row b attends to slots pad[b]..pos (``pad`` (B,) int64).
    Returns (B, H, D)."""
    args = (q, k, v, k_codes, k_scale, k_min, v_codes, v_scale, v_min, pad, pos, bits, scale)
    tensors = args[:9]
    native = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    if native and q.dtype == k.dtype == v.dtype == torch.float32 and native_ops():
        return torch.ops.lowbit_cpu.attend_codes(*args)
    return attend_codes_reference(*args)

"""The small fused operations of a decode step (``csrc/decode_ops.cpp``) and their references.

Each wrapper calls the native op for float32 CPU tensors when the kernels are built, else the
plain-PyTorch reference beside it, which defines the result (the arithmetic of transformers'
Llama RMSNorm, SiLU MLP and rotate-half RoPE attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops
from lowbit.primitives.kv import cache_values

PROMPT_ROWS = 32  # above this many rows the decode loop leaves the one-call step (llama.py)


def _native(*tensors: Tensor) -> bool:
    ok = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return ok and native_ops()


def rms_norm_reference(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm of x (..., C) with weight w (C)."""
    if _native(x, w) and x.is_contiguous():
        return torch.ops.lowbit_cpu.rms_norm(x, w, eps)
    return rms_norm_reference(x, w, eps)


def add_rms_norm(x: Tensor, d: Tensor, w: Tensor, eps: float) -> Tensor:
    """x += d in place (the residual stream), then RMSNorm(x)."""
    if _native(x, d, w) and x.is_contiguous() and d.is_contiguous():
        return torch.ops.lowbit_cpu.add_rms_norm(x, d, w, eps)
    x.add_(d)
    return rms_norm_reference(x, w, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """(..., 2n) [gate | up] -> (..., n) silu(gate)·up: the native op (a decode step's rows in
    one loop, a prompt's split over torch's threads) or torch's ops."""
    if _native(gate_up) and gate_up.is_contiguous():
        return torch.ops.lowbit_cpu.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_qk(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int,
            q_norm: Tensor | None, k_norm: Tensor | None, eps: float
            ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A prompt's q/k/v rows (B, t, (H + 2·Hkv)·D) -> q (B, H, t, D), k and v (B, Hkv, t, D):
    query and key heads normed by ``q_norm`` / ``k_norm`` (weights, or None) and rotated by
    ``cos``/``sin`` (t, D, or (B, 1, t, D) for left-padded rows). The native op rotates them
    in place in ``qkv`` (one threaded pass for ~10 small torch ops per layer); the reference,
    :func:`rms_norm` and :func:`rotate`, defines the result."""
    b, t, w = qkv.shape
    d = w // (heads + 2 * kv_heads)
    norms = [n for n in (q_norm, k_norm) if n is not None]
    if (_native(qkv, cos, sin, *norms) and qkv.is_contiguous() and cos.dim() == 2
            and d % 2 == 0 and d <= 512):  # fmt: skip
        qn, kn = (qkv.new_empty(0) if n is None else n.contiguous() for n in (q_norm, k_norm))
        torch.ops.lowbit_cpu.rope_qk(qkv, cos.contiguous(), sin.contiguous(), heads, kv_heads,
                                     qn, kn, eps)  # fmt: skip
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k = q.view(b, t, heads, d).transpose(1, 2), k.view(b, t, kv_heads, d).transpose(1, 2)
        return q, k, v.view(b, t, kv_heads, d).transpose(1, 2)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.reshape(b, t, heads, d), k.reshape(b, t, kv_heads, d)
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
    return q, k, v.reshape(b, t, kv_heads, d).transpose(1, 2)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in transformers' rotate-half layout, in ``x``'s dtype (the float32 tables are
    rounded to it first, as transformers does)."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decode_attention_reference(
    qkv: Tensor, kc: Tensor, vc: Tensor, cos: Tensor, sin: Tensor, pad: Tensor, pos: int,
    heads: int, kv_heads: int, scale: float, q_norm: Tensor, k_norm: Tensor, eps: float,
) -> Tensor:  # fmt: skip
    """See :func:`decode_attention`."""
    b, dim = qkv.shape[0], kc.shape[-1]
    q, k, v = qkv.view(b, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
    if q_norm.numel():
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    p = (pos - pad).clamp_min(0)  # (B,) positions skip the left padding
    c, s = cos[p].unsqueeze(1), sin[p].unsqueeze(1)  # (B, 1, D)
    kc[:, :, pos] = cache_values(rotate(k, c, s), kc.dtype)
    vc[:, :, pos] = cache_values(v, vc.dtype)
    real = torch.arange(pos + 1).unsqueeze(0) >= pad.unsqueeze(1)  # (B, S)
    keys, values = (t[:, :, : pos + 1].to(q.dtype) for t in (kc, vc))  # a float16 cache: read
    a = F.scaled_dot_product_attention(
        rotate(q, c, s).unsqueeze(2), keys, values, attn_mask=real.view(b, 1, 1, -1),
        scale=scale, enable_gqa=True,
    )  # fmt: skip  # (B, H, 1, D)
    return a.reshape(b, heads * dim)


def decode_attention(
    qkv: Tensor, kc: Tensor, vc: Tensor, cos: Tensor, sin: Tensor, pad: Tensor, pos: int,
    heads: int, kv_heads: int, scale: float, q_norm: Tensor, k_norm: Tensor, eps: float,
) -> Tensor:  # fmt: skip
    """Attention of one new token per row. qkv (B, (H + 2·Hkv)·D) as the projections give it;
    kc/vc (B, Hkv, T, D) one layer's cache (float32, or float16 for float32 inputs: see
    :func:`~lowbit.primitives.kv.cache_values`), written at slot ``pos``; cos/sin (T, D) tables by
    position; pad (B,) left-padding slots per row (never attended). Optional per-head norms
    (``q_norm``/``k_norm`` (D) or empty). Returns (B, H·D)."""
    args = (qkv, kc, vc, cos, sin, pad, pos, heads, kv_heads, scale, q_norm, k_norm, eps)
    stored = kc.dtype in (torch.float32, torch.float16) and vc.dtype == kc.dtype
    if _native(qkv, cos, sin) and stored and kc.is_contiguous() and vc.is_contiguous():
        return torch.ops.lowbit_cpu.decode_attention(*args)
    return decode_attention_reference(*args)

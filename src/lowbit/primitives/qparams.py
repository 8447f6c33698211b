"""Scales and zero points from a range, and the quantize / dequantize maps they define.

Codes are unsigned integers ``u`` in ``[0, 2**bits)`` (uint8), or float8 values for fp8. The grid
conventions are documented in :mod:`lowbit.formats.qtype`. Quantization always uses the scale
*after* it is rounded to its storage dtype, so that stored codes and stored scales agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.qtype import QType, nf4_codebook


@dataclass(frozen=True)
class Grid:
    """Everything that fixes the meaning of a code, apart from the per-block numbers."""

    qtype: QType
    symmetric: bool
    zero_point: str = "float"  # "float": x = u*s + z (offset); "int": x = (u - z)*s
    scale_dtype: torch.dtype = torch.float16


@dataclass
class QParams:
    """Per-block numbers: ``scale`` and, for asymmetric integer grids, ``zero``.

    Shapes match the blocked tensor minus its last dim, e.g. (out, in/group) for weights.
    ``zero`` is an fp offset (float domain) or a uint8 code (int domain).
    """

    scale: Tensor | None
    zero: Tensor | None = None


def choose_qparams(lo: Tensor, hi: Tensor, grid: Grid) -> QParams:
    """Scale (and zero) that map the range [lo, hi] of each block onto the grid."""
    qt = grid.qtype
    if qt.kind == "float":
        return QParams(None, None)
    lo, hi = lo.float(), hi.float()
    if grid.symmetric:
        amax = torch.maximum(-lo, hi).clamp_min(0)
        divisor = qt.sym_max if qt.kind == "int" else qt.float_max
        return QParams(_store_scale(amax / divisor, grid.scale_dtype), None)
    if grid.zero_point == "int":
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)  # the grid must contain an exact zero
        scale = _store_scale((hi - lo) / qt.code_max, grid.scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, qt.code_max).to(torch.uint8)
        return QParams(scale, zero)
    scale = _store_scale((hi - lo) / qt.code_max, grid.scale_dtype)
    offset = lo.to(grid.scale_dtype)
    if not torch.isfinite(offset).all():
        raise LowbitError(f"a block minimum does not fit in {grid.scale_dtype}")
    return QParams(scale, offset)


def _store_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Round scales to their storage dtype; a zero-width block gets scale 1 (any scale is exact)."""
    if not torch.isfinite(scale).all():
        raise LowbitError("non-finite value in a tensor being quantized (NaN or inf)")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = scale.to(dtype)
    if torch.isinf(stored).any():
        raise LowbitError(f"a scale of {scale.max().item():.3g} overflows {dtype}; use float32")
    tiny = torch.finfo(dtype).smallest_normal if dtype != torch.float32 else 1e-30
    return torch.where(stored > 0, stored, torch.full_like(stored, tiny))


def quantize(xb: Tensor, qp: QParams, grid: Grid) -> Tensor:
    """Codes of a blocked tensor (..., n) given per-block params of shape (...)."""
    qt = grid.qtype
    if qt.kind == "float":
        return xb.to(qt.torch_dtype)
    if qt.kind == "codebook":  # nearest entry of each block's ascending table (..., K)
        book = qp.scale.float()
        mids = (book[..., 1:] + book[..., :-1]) / 2  # (..., K-1)
        return torch.searchsorted(mids.contiguous(), xb.contiguous()).to(torch.uint8)
    s = qp.scale.float().unsqueeze(-1)
    if qt.kind == "fp8":
        return (xb / s).clamp(-qt.float_max, qt.float_max).to(qt.torch_dtype)
    if qt.kind == "nf":
        book = torch.tensor(nf4_codebook(), dtype=torch.float32, device=xb.device)
        mids = (book[1:] + book[:-1]) / 2
        return torch.bucketize((xb / s).clamp(-1, 1), mids).to(torch.uint8)
    if grid.symmetric:
        u = torch.round(xb / s) + qt.mid
    elif grid.zero_point == "int":
        u = torch.round(xb / s) + qp.zero.float().unsqueeze(-1)
    else:
        u = torch.round((xb - qp.zero.float().unsqueeze(-1)) / s)
    return u.clamp(0, qt.code_max).to(torch.uint8)


def dequantize(codes: Tensor, qp: QParams, grid: Grid) -> Tensor:
    """Float32 values of blocked codes (..., n); the inverse map of :func:`quantize`."""
    qt = grid.qtype
    if qt.kind == "float":
        return codes.float()
    if qt.kind == "codebook":
        return torch.gather(qp.scale.float(), -1, codes.long())  # book (..., K), codes (..., n)
    s = qp.scale.float().unsqueeze(-1)
    if qt.kind == "fp8":
        return codes.float() * s
    if qt.kind == "nf":
        book = torch.tensor(nf4_codebook(), dtype=torch.float32, device=codes.device)
        return book[codes.long()] * s
    u = codes.float()
    if grid.symmetric:
        return (u - qt.mid) * s
    if grid.zero_point == "int":
        return (u - qp.zero.float().unsqueeze(-1)) * s
    return u * s + qp.zero.float().unsqueeze(-1)


def fake_quantize_range(xb: Tensor, lo: Tensor, hi: Tensor, grid: Grid) -> Tensor:
    """Quantize-dequantize a blocked tensor over the given per-block ranges (no gradient)."""
    qp = choose_qparams(lo, hi, grid)
    return dequantize(quantize(xb, qp, grid), qp, grid)

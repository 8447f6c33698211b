"""Fake quantization with a straight-through gradient (for QAT and LKD).

The forward pass returns the quantize-dequantize value; the backward pass treats rounding as the
identity (Bengio et al. 2013), so gradients reach the float weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.primitives.qparams import Grid, QParams, dequantize, quantize
from lowbit.primitives.weight import quantize_weight


def fake_quantize(xb: Tensor, qp: QParams, grid: Grid) -> Tensor:
    """Blocked quantize-dequantize with a straight-through gradient w.r.t. ``xb``."""
    with torch.no_grad():
        q = dequantize(quantize(xb, qp, grid), qp, grid).to(xb.dtype)
    return xb + (q - xb).detach()


def fake_quantize_weight(w: Tensor, spec: WeightSpec, layer: str = "") -> Tensor:
    """``w`` (out, in) on the spec's grid (range from its observer), gradient passed straight."""
    with torch.no_grad():
        q = quantize_weight(w, spec, layer).dequantize().to(w.dtype)
    return w + (q - w).detach()


def ste_codes(xb: Tensor, qp: QParams, grid: Grid, shift: Tensor | None = None) -> Tensor:
    """Unsigned integer codes of a blocked tensor (..., n) on an integer grid, as a float tensor
    that is differentiable: rounding passes gradients straight through to ``xb``, ``shift``
    and the float params in ``qp`` (an integer zero point is held fixed). ``shift`` (the shape
    of ``xb``, in grid steps) is added before rounding: AutoRound's learned offsets.
    ``dequantize(ste_codes(...), qp, grid)`` is then the differentiable quantized value, and
    ``ste_codes(...).to(torch.uint8)`` the codes that store exactly that value."""
    qt = grid.qtype
    if qt.kind != "int":
        raise LowbitError(f"learned rounding needs an integer grid, not {qt.name}")
    s = qp.scale.float().unsqueeze(-1)
    if grid.symmetric:
        t = xb / s + qt.mid
    elif grid.zero_point == "int":
        t = xb / s + qp.zero.float().unsqueeze(-1)
    else:
        t = (xb - qp.zero.float().unsqueeze(-1)) / s
    if shift is not None:
        t = t + shift
    u = t + (torch.round(t) - t).detach()
    return u.clamp(0, qt.code_max)

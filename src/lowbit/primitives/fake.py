"""Fake quantization with a straight-through gradient (for QAT and LKD).

The forward pass returns the quantize-dequantize value; the backward pass treats rounding as the
identity (Bengio et al. 2013), so gradients reach the float weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

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

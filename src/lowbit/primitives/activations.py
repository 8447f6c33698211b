"""Activation quantization: the run-time rounding of a linear layer's inputs (pure functions).

Activations use integer grids with float32 scales; asymmetric grids keep an integer zero point
(``x = (u - z)·s``, so 0 is exact, as integer kernels need). Two ways to get the range:

- dynamic (ZeroQuant): computed from the input as it arrives, one range per row (token) or one
  for the whole tensor;
- static: one range per layer, calibrated beforehand from sampled inputs with any observer
  (min-max, percentile, MSE, entropy, mean ± k·std) and stored with the model.

A range that collapses (a constant or all-zero input) gets scale 1 from :func:`choose_qparams`
rather than a division by zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.spec import ActivationSpec
from lowbit.primitives.observers import observe
from lowbit.primitives.qparams import Grid, QParams, choose_qparams, dequantize, quantize


def act_grid(spec: ActivationSpec) -> Grid:
    return Grid(spec.qtype, spec.symmetric, "int", torch.float32)


def act_qparams(lo: Tensor, hi: Tensor, spec: ActivationSpec) -> QParams:
    """Scale (and integer zero) for the ranges [lo, hi]; the range always contains 0."""
    return choose_qparams(lo.clamp_max(0.0), hi.clamp_min(0.0), act_grid(spec))


def fake_quantize_dynamic(x: Tensor, spec: ActivationSpec) -> Tensor:
    """Quantize-dequantize ``x`` (..., in) with ranges taken from ``x`` itself: per row for
    ``granularity: token``, over the whole tensor for ``tensor``."""
    xf = x.float()
    if spec.granularity == "token":
        lo, hi = xf.amin(-1), xf.amax(-1)  # (...,): one range per token
        blocks = xf
    else:
        lo, hi = xf.amin().reshape(1), xf.amax().reshape(1)
        blocks = xf.reshape(1, -1)
    qp, grid = act_qparams(lo, hi, spec), act_grid(spec)
    return dequantize(quantize(blocks, qp, grid), qp, grid).reshape(x.shape).to(x.dtype)


def fake_quantize_static(x: Tensor, qp: QParams, spec: ActivationSpec) -> Tensor:
    """Quantize-dequantize ``x`` with one stored (scale, zero) of shape (1,)."""
    grid = act_grid(spec)
    blocks = x.float().reshape(1, -1)
    return dequantize(quantize(blocks, qp, grid), qp, grid).reshape(x.shape).to(x.dtype)


def tensor_qparams(x: Tensor, spec: ActivationSpec, static: QParams | None = None) -> QParams:
    """The per-tensor (scale, integer zero) of ``x``'s codes, ``x ≈ (codes - zero)·scale``:
    ``static``'s range, or ``x``'s own (dynamic); a symmetric grid's zero is its middle code."""
    qp = static
    if qp is None:
        xf = x.float()
        qp = act_qparams(xf.amin().reshape(1), xf.amax().reshape(1), spec)
    if qp.zero is None:  # symmetric: codes = round(x / scale) + mid
        return QParams(qp.scale, torch.full((1,), spec.qtype.mid, dtype=torch.uint8))
    return qp


def act_codes(x: Tensor, qp: QParams, spec: ActivationSpec) -> Tensor:
    """The integer codes (uint8, ``x``'s shape and memory layout) of a per-tensor grid with
    :func:`tensor_qparams`'s ``qp``: what an integer kernel reads (the reference of
    ``lowbit_cpu::quantize_u8``); the fake-quantizers above round to the same grid."""
    return quantize(x.float(), qp, act_grid(spec))  # one (1,) range broadcast over every element


def static_qparams(sample: Tensor, spec: ActivationSpec) -> QParams:
    """One layer's static (scale, zero), each of shape (1,), from a 1-D sample of its inputs
    chosen by ``spec.observer`` (the sample should include the exact extremes for min-max)."""
    lo, hi = observe(sample.float().reshape(1, -1), spec.observer, act_grid(spec))
    return act_qparams(lo, hi, spec)

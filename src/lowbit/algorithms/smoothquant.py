"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing.

A few input channels of a linear carry activations 10–100× larger than the rest, and a per-token
range sized for them leaves the other channels with few levels. Dividing input channel j by

    s_j = max|X_j|^α / max|W_j|^(1-α)

(and multiplying the weights' column j by s_j, exact when the division is folded into the module
that feeds the linears) flattens those channels at the cost of a wider weight range. ``alpha``
fixes α; without it α is searched per group of linears on their output error with quantized
activations and weights (the search the SmoothQuant authors do by hand per model). The
candidates include "no smoothing", so a search never makes a group worse on its samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.primitives import fake_quantize_weight
from lowbit.primitives.activations import fake_quantize_dynamic


@dataclass(frozen=True)
class SmoothQuantOptions:
    """``alpha``: migration strength in [0, 1] (None: search ``grid`` per group);
    ``search_rows``: input rows sampled for the search."""

    alpha: float | None = None
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    search_rows: int = 2048

    def __post_init__(self) -> None:
        alphas = (*self.grid, *(() if self.alpha is None else (self.alpha,)))
        if not all(0.0 <= a <= 1.0 for a in alphas) or not self.grid:
            raise LowbitError("smoothquant.alpha and smoothquant.grid values must be in [0, 1]")
        if self.search_rows < 16:
            raise LowbitError("smoothquant.search_rows must be >= 16")


def smoothing_factors(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """s (in,) for inputs whose per-channel max |x| is ``act_absmax``, read by ``weights``
    (each (out, in)); channels that never fire or have all-zero weights get s = 1."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    a = act_absmax.float()
    s = a.pow(alpha) / w_max.pow(1.0 - alpha)
    ok = (a > 0) & (w_max > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)


def output_error(
    x: Tensor,
    weights: Sequence[Tensor],
    wspecs: Sequence[WeightSpec],
    act: ActivationSpec | None,
    s: Tensor | None,
) -> float:
    """Relative squared error of the linears' outputs on ``x`` (rows, in) when the inputs are
    divided by ``s``, the weights multiplied by it, and both rounded (RTN weights)."""
    xs = x if s is None else x / s
    xq = xs if act is None else fake_quantize_dynamic(xs, act.as_dynamic())
    num = den = 0.0
    for w, spec in zip(weights, wspecs, strict=True):
        ws = w.float() if s is None else w.float() * s
        ref = F.linear(x, w.float())
        err = F.linear(xq, fake_quantize_weight(ws, spec)) - ref
        num += float(err.double().pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return num / max(den, 1e-30)


def search_alpha(
    act_absmax: Tensor,
    weights: Sequence[Tensor],
    options: SmoothQuantOptions,
    error: Callable[[Tensor | None], float],
) -> tuple[Tensor | None, float | None]:
    """(s, α) with the least ``error(s)`` (``error(None)``: without smoothing; for linears,
    :func:`output_error` on sampled inputs); (None, None) when no smoothing wins (or with a
    fixed ``options.alpha``: its factors, without scoring). ``weights``: (rows, in) matrices
    whose columns are the smoothed input channels."""
    if options.alpha is not None:
        return smoothing_factors(act_absmax, weights, options.alpha), options.alpha
    best = (error(None), None, None)
    for alpha in options.grid:
        s = smoothing_factors(act_absmax, weights, alpha)
        err = error(s)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]

"""AWQ (Lin et al. 2024): protect the input channels that carry large activations.

Scaling input channel j of a linear by s_j (and dividing the feeding module's output by s_j)
leaves the float model unchanged but shrinks the relative rounding error of salient weights.
The scales are s = mean|x|^α (with ``duo`` scaling, divided by mean|w|^(1−α) as AutoAWQ does),
normalised to a geometric mean of 1; α is searched on a grid by the output error of the module
the scaled linears feed, with "no scaling" as a candidate too, so the chosen scales are never
worse than plain RTN on the search data. This file holds the pure parts: scales for one α and
the search loops over a loss the caller evaluates: :func:`search_scales` scores the effective
weights of one module's linears (language-model blocks), :func:`choose_scales` scores the
candidate scales themselves (a model quantized whole folds them and measures its own output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.spec import ObserverSpec, WeightSpec
from lowbit.primitives import quantize_weight


@dataclass(frozen=True)
class AWQOptions:
    """``grid``: α steps in [0, 1); ``duo``: weight-magnitude term in the scales;
    ``clip``: output-error clipping search of group ranges after scaling (``clip_steps`` factors
    down to ``1 − clip_max_shrink``); ``search_samples``: calibration windows used for the α
    search (the statistics use them all; a model quantized whole scores its first calibration
    batch)."""

    grid: int = 20
    duo: bool = True
    clip: bool = True
    clip_steps: int = 20
    clip_max_shrink: float = 0.5
    search_samples: int = 16

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_steps < 1 or not 0 <= self.clip_max_shrink < 1:
            raise LowbitError("awq: grid and clip_steps must be >= 1, clip_max_shrink in [0, 1)")
        if self.search_samples < 1:
            raise LowbitError("awq: search_samples must be >= 1")


def awq_scales(x_absmean: Tensor, weights: list[Tensor], alpha: float, duo: bool) -> Tensor:
    """Per-input-channel scales (in,) for exponent ``alpha``."""
    s = x_absmean.float().clamp_min(1e-8).pow(alpha)
    if duo:
        w = torch.cat([wt.detach().float() for wt in weights], dim=0)  # (sum out, in)
        w_mean = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).mean(0)
        s = s / (w_mean.pow(1.0 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scales(
    x_absmean: Tensor,
    weights: list[Tensor],
    specs: list[WeightSpec],
    loss: Callable[[list[Tensor]], float],
    options: AWQOptions,
) -> tuple[Tensor, float | None, list[float]]:
    """(best scales, best α or None for no scaling, losses: no scaling first, then each α).
    ``loss`` receives the effective weights Q(W·diag(s))·diag(1/s) of each linear and returns
    the module's output error. Candidates are quantized with min-max ranges (the spec's own
    range search, e.g. HQQ, runs once on the chosen scales, not on every candidate)."""
    specs = [_minmax(spec) for spec in specs]
    losses, best = [], (None, None, float("inf"))
    candidates = [(None, torch.ones_like(x_absmean, dtype=torch.float32))]
    for i in range(options.grid):
        alpha = i / options.grid
        candidates.append((alpha, awq_scales(x_absmean, weights, alpha, options.duo)))
    for alpha, s in candidates:
        effective = [
            quantize_weight(w.detach().float() * s, spec).dequantize() / s
            for w, spec in zip(weights, specs, strict=True)
        ]
        value = loss(effective)
        losses.append(value)
        if value < best[2]:
            best = (s, alpha, value)
    if best[0] is None:
        raise LowbitError("awq: every scale candidate gave a non-finite loss")
    return best[0], best[1], losses


def choose_scales(
    x_absmean: Tensor,
    weights: list[Tensor],
    options: AWQOptions,
    error: Callable[[Tensor | None], float],
) -> tuple[Tensor | None, float | None]:
    """(s, α) with the least ``error(s)`` over α = 0, 1/grid, ..., (grid-1)/grid; (None, None)
    when no scaling (``error(None)``) is as good or better. ``weights``: (rows, in) matrices
    whose columns are the scaled input channels."""
    best: tuple[float, Tensor | None, float | None] = (error(None), None, None)
    for i in range(options.grid):
        alpha = i / options.grid
        s = awq_scales(x_absmean, weights, alpha, options.duo)
        value = error(s)
        if value < best[0]:
            best = (value, s, alpha)
    return best[1], best[2]


def _minmax(spec: WeightSpec) -> WeightSpec:
    return spec if spec.observer.name == "minmax" else spec.replace(observer=ObserverSpec())

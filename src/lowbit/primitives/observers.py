"""Range observers: choose [lo, hi] for each block of a blocked tensor (..., n).

All are pure functions of the values. ``minmax`` keeps every value representable; ``hqq``
optimises the range for a sparse error (see :mod:`lowbit.primitives.hqq`); the others clip
outliers to spend the grid's resolution where most values are, which lowers the total error on
heavy-tailed data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.spec import ObserverSpec
from lowbit.primitives.hqq import hqq_range
from lowbit.primitives.qparams import Grid, fake_quantize_range


def observe(xb: Tensor, spec: ObserverSpec, grid: Grid) -> tuple[Tensor, Tensor]:
    """(lo, hi), each of shape ``xb.shape[:-1]``, chosen by the observer ``spec.name``."""
    xb = xb.float()
    if spec.name == "minmax":
        return xb.amin(-1), xb.amax(-1)
    if spec.name == "percentile":
        return _percentile(xb, spec.percentile)
    if spec.name == "meanstd":
        return _meanstd(xb, spec.k)
    if spec.name == "mse":
        return _mse(xb, spec, grid)
    if spec.name == "entropy":
        return _entropy(xb, spec.bins, grid.qtype.mid)
    if spec.name == "hqq":
        if grid.qtype.kind != "int":
            raise LowbitError(f"observer hqq needs an integer grid, not {grid.qtype.name}")
        # from min-max: clipping long rows first hurt outputs (see lowbit.primitives.hqq)
        return hqq_range(xb, grid.qtype, grid.symmetric, None, spec.hqq_p, spec.hqq_beta,
                         spec.hqq_kappa, spec.hqq_iters)  # fmt: skip
    raise ValueError(f"unknown observer {spec.name!r}")


def _percentile(xb: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    n = xb.shape[-1]
    k_hi = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    k_lo = n + 1 - k_hi
    return xb.kthvalue(k_lo, dim=-1).values, xb.kthvalue(k_hi, dim=-1).values


def _meanstd(xb: Tensor, k: float) -> tuple[Tensor, Tensor]:
    mean, std = xb.mean(-1), xb.std(-1, correction=0)
    lo = torch.maximum(mean - k * std, xb.amin(-1))
    hi = torch.minimum(mean + k * std, xb.amax(-1))
    return lo, hi


def _mse(xb: Tensor, spec: ObserverSpec, grid: Grid) -> tuple[Tensor, Tensor]:
    """Shrink the min-max range by p in {1, 1 - 1/grid, ...} and keep the best p per block.

    The error is sum |x - q(x)|^norm (norm 2.4 by default, as in the GPTQ reference code, which
    weighs large errors a little more than plain MSE).
    """
    lo0, hi0 = xb.amin(-1), xb.amax(-1)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = torch.full_like(lo0, float("inf"))
    for i in range(int(spec.max_shrink * spec.grid) + 1):
        p = 1.0 - i / spec.grid
        lo, hi = lo0 * p, hi0 * p
        err = (fake_quantize_range(xb, lo, hi, grid) - xb).abs().pow(spec.norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _entropy(xb: Tensor, bins: int, levels: int) -> tuple[Tensor, Tensor]:
    """TensorRT-style KL calibration of a clipping threshold T on |x|, per block.

    Histogram |x| into ``bins`` bins; for each candidate T (a bin edge), fold the tail into the
    last kept bin (P), requantize the kept bins into ``levels`` levels (Q), and keep the T with the
    least KL(P || Q). Returns (max(min, -T), min(max, T)).
    """
    lead = xb.shape[:-1]
    flat = xb.reshape(-1, xb.shape[-1])  # (B, n)
    amax = flat.abs().amax(-1).clamp_min(1e-30)  # (B,)
    idx = (flat.abs() / amax[:, None] * bins).long().clamp_max(bins - 1)
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=xb.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    start = min(levels, bins)
    candidates = sorted(set(torch.linspace(start, bins, 128).round().long().tolist()))
    best_kl = torch.full((flat.shape[0],), float("inf"), dtype=torch.float64)
    best_t = torch.full((flat.shape[0],), bins, dtype=torch.float64)
    for t in candidates:
        kl = _kl_clipped(hist, t, levels)
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_t = torch.where(better, torch.full_like(best_t, t), best_t)
    thr = (best_t / bins).float() * amax
    lo = torch.maximum(-thr, flat.amin(-1))
    hi = torch.minimum(thr, flat.amax(-1))
    return lo.reshape(lead), hi.reshape(lead)


def _kl_clipped(hist: Tensor, t: int, levels: int) -> Tensor:
    """KL(P || Q) per row for clipping the histogram at bin ``t`` and requantizing to ``levels``.

    P is the kept bins with the clipped tail folded into the last one; Q spreads each level's
    count of the *unfolded* bins evenly over its non-empty bins. The fold is what makes clipping
    cost something: P's last bin holds the tail's mass, Q's does not.
    """
    kept = hist[:, :t]  # (B, t)
    p = kept.clone()
    p[:, -1] += hist[:, t:].sum(-1)
    chunk = (torch.arange(t, device=hist.device) * levels // t).expand_as(kept)
    nonzero = (kept > 0).double()
    sums = torch.zeros(kept.shape[0], levels, dtype=kept.dtype).scatter_add_(1, chunk, kept)
    counts = torch.zeros_like(sums).scatter_add_(1, chunk, nonzero)
    q = torch.gather(sums / counts.clamp_min(1), 1, chunk) * nonzero
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
    ratio = torch.where(p > 0, p / q.clamp_min(1e-12), torch.ones_like(p))
    return (p * ratio.log()).sum(-1)

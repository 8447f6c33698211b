"""K-means codebook weights: each block (a row, or a group of a row) gets its own 2**bits values.

A uniform grid spends its levels evenly between the block's extremes; weights are bell-shaped,
so most levels sit where few weights are. A per-block codebook fitted by 1-D K-means (Lloyd's
algorithm, as in SqueezeLLM) puts the levels where the weights are. With calibration data the
fit is weighted by each input's mean squared activation (the Hessian diagonal), so that errors on
inputs that carry large activations cost more (SqueezeLLM's sensitivity weighting, simplified to
the Hessian diagonal). Stored as packed indices plus one fp16 table per block; the tables are
rounded to fp16 before the final assignment, so stored codes and tables agree exactly.

Written here because no maintained library exposes a batched, weighted 1-D K-means over
thousands of small blocks (scikit-learn's runs one problem at a time on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.primitives import QParams, QuantizedWeight
from lowbit.primitives.blocks import from_blocks, to_blocks
from lowbit.primitives.qparams import quantize
from lowbit.primitives.weight import grid_of


def kmeans_1d(x: Tensor, k: int, weights: Tensor | None = None, iters: int = 25) -> Tensor:
    """Ascending centroids (..., k) of weighted 1-D K-means on each row of ``x`` (..., n).

    Starts from the weighted quantiles (evenly spaced in cumulative weight), so every centroid
    begins inside the data; an empty cluster keeps its previous centroid.
    """
    x = x.float()
    w = torch.ones_like(x) if weights is None else weights.float().expand_as(x).clamp_min(1e-12)
    xs, order = x.sort(-1)
    ws = w.gather(-1, order)
    cum = ws.cumsum(-1)
    probs = (torch.arange(k, device=x.device, dtype=x.dtype) + 0.5) / k  # (k,)
    targets = probs * cum[..., -1:]  # (..., k)
    idx = torch.searchsorted(cum.contiguous(), targets.contiguous()).clamp_max(x.shape[-1] - 1)
    centroids = xs.gather(-1, idx)  # (..., k)
    for _ in range(iters):
        mids = (centroids[..., 1:] + centroids[..., :-1]) / 2
        assign = torch.searchsorted(mids.contiguous(), x.contiguous())  # (..., n) in [0, k)
        mass = torch.zeros_like(centroids).scatter_add_(-1, assign, w)
        total = torch.zeros_like(centroids).scatter_add_(-1, assign, w * x)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-30), centroids)
        new = new.sort(-1).values
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def kmeans(
    weight: Tensor, spec: WeightSpec, importance: Tensor | None = None, layer: str = ""
) -> QuantizedWeight:
    """Codebook-quantize ``weight`` (out, in) to ``spec`` (format ``kmeans``); ``importance``
    (in,) weighs each input column's errors (e.g. the Hessian diagonal), uniform when None."""
    w = weight.detach().float()
    block = weight_block(spec, w.shape[0], w.shape[1], layer)
    grid = grid_of(spec)
    xb = to_blocks(w, block)  # (nR, nC, br*bc)
    imp = None
    if importance is not None:
        imp = to_blocks(importance.float().expand_as(w), block)
    book = kmeans_1d(xb, spec.qtype.levels, imp)
    book = book.to(grid.scale_dtype).float().sort(-1).values  # what is stored
    qp = QParams(book.to(grid.scale_dtype))
    codes = from_blocks(quantize(xb, qp, grid), block)
    return QuantizedWeight(codes, qp, spec, block)

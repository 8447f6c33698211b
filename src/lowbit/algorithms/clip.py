"""Range clipping that minimises the *output* error of a layer, not its weight error.

For a block of weights and its error e = w − q(w), the layer's squared output error over the
calibration inputs is e·H·eᵀ with H = XᵀX; for group-wise grids only the diagonal blocks of H
matter (each group's error meets its own inputs). Shrinking the min-max range by each factor
in a grid and keeping, per group, the factor with the least e·H_gg·eᵀ is AWQ's clipping search,
done in closed form from the Hessian instead of re-running the layer on sampled tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.primitives import fake_quantize_range, grid_of, observe, to_blocks


def output_error_range(
    weight: Tensor, hessian: Tensor, spec: WeightSpec, steps: int = 20, max_shrink: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Per-block (lo, hi) minimising the layer-output error e·H·eᵀ (blocks along rows only).

    The search starts from the spec's observer's range and tries factors
    1, 1 − max_shrink/steps, ..., 1 − max_shrink.
    """
    w = weight.detach().float()
    n_out, n_in = w.shape
    block = weight_block(spec, n_out, n_in)
    grid = grid_of(spec)
    xb = to_blocks(w, block)  # (nR, nC, br*bc)
    lo0, hi0 = observe(xb, spec.observer, grid)
    gsize = block[1]
    hb = torch.stack([hessian[i : i + gsize, i : i + gsize] for i in range(0, n_in, gsize)]).float()
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best = torch.full_like(lo0, float("inf"))
    for i in range(steps + 1):
        f = 1.0 - max_shrink * i / steps
        lo, hi = lo0 * f, hi0 * f
        err = _block_errors(fake_quantize_range(xb, lo, hi, grid) - xb, hb, block, n_out)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _block_errors(eb: Tensor, hb: Tensor, block: tuple, n_out: int) -> Tensor:
    """e·H_gg·eᵀ per block; ``eb`` (nR, nC, br*bc) errors, ``hb`` (nC, bc, bc)."""
    br, bc = block
    e = eb.reshape(eb.shape[0], eb.shape[1], br, bc)  # (nR, nC, br, bc)
    return torch.einsum("rgoi,gij,rgoj->rg", e, hb, e)

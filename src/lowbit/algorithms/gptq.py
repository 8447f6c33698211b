"""GPTQ (Frantar et al. 2023): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ||W X - Ŵ X||² (H = 2 X Xᵀ / n).

The core is a pure function: (weight, Hessian, spec, options) -> QuantizedWeight. Details:
- dampening: H + λ·mean(diag H)·I; if the Cholesky factorisation still fails, λ grows tenfold
  (logged) instead of crashing; inputs that never fired (diag H = 0) keep their weights and get
  a unit diagonal, so they take no error and give none;
- lazy batches: errors inside a block of ``block_size`` columns are applied at once to the rest;
- activation order: columns with the largest diag(H) go first; group ranges are then fixed from
  the original weights before any update ("static groups"), so the stored layout is the plain
  one and inference needs no index permutation;
- group ranges come from the spec's observer (min-max, MSE clipping, HQQ...) applied to the
  group's current, error-updated weights when the group is reached (unless static).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.primitives import (
    QParams,
    QuantizedWeight,
    choose_qparams,
    dequantize,
    grid_of,
    observe,
    quantize,
    quantize_weight,
    to_blocks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    """``damp``: dampening relative to the mean Hessian diagonal; ``block_size``: lazy-update
    width; ``act_order``: largest-Hessian columns first (implies static groups);
    ``static_groups``: group ranges from the original weights; ``true_sequential``: quantize a
    block's linears in the order the block reads them, re-measuring inputs after each group."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.damp < 10 or self.block_size < 1:
            raise LowbitError("gptq: damp must be in (0, 10) and block_size >= 1")


def gptq(
    weight: Tensor, hessian: Tensor, spec: WeightSpec, options: GPTQOptions, layer: str = ""
) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) given the input Hessian (in, in). A float storage format
    (fp16/bf16: a mixed recipe's ``float`` layers) has no grid to fit: it is stored as is."""
    if grid_of(spec).qtype.kind == "float" and spec.format in ("fp16", "bf16"):
        return quantize_weight(weight, spec, layer)
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.detach().double().clone()  # (in, in)
    n_out, n_in = w.shape
    block = weight_block(spec, n_out, n_in, layer)
    grid = grid_of(spec)
    if grid.qtype.kind == "float":
        raise LowbitError(f"{layer}: GPTQ needs a quantized grid, not {spec.format}")
    group = block[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    static = options.act_order or options.static_groups or spec.granularity != "group"
    scales, zeros = _empty_params(block, n_out, n_in, grid, spec)
    if static:
        qp = _params(w, spec, block, grid)
        scales, zeros = qp.scale, qp.zero
    perm = torch.argsort(torch.diagonal(h), descending=True) if options.act_order else None
    if perm is not None:  # one (in, in) copy at a time: 8192² float64 is 537 MB
        w, h = w[:, perm], h[perm]
        h = h[:, perm]
    hinv = _inverse_hessian_factor(h, options.damp, layer).float()  # upper Cholesky of H^-1
    del h
    codes = torch.zeros(n_out, n_in, dtype=grid.qtype.torch_dtype)
    for i1 in range(0, n_in, options.block_size):
        i2 = min(i1 + options.block_size, n_in)
        w1 = w[:, i1:i2].clone()  # (out, B)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            g = orig // group
            if not static and orig % group == 0:  # first column of a group: fix its range now
                current = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                qp_g = _params(current, spec, (1, group), grid)
                scales[:, g] = qp_g.scale[:, 0]
                if zeros is not None:
                    zeros[:, g] = qp_g.zero[:, 0]
            qp_col = _column_params(scales, zeros, g, block)
            x = w1[:, i : i + 1]  # (out, 1)
            c = quantize(x, qp_col, grid)
            q = dequantize(c, qp_col, grid)
            codes[:, orig] = c[:, 0]
            e = (x - q)[:, 0] / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(codes, QParams(scales, zeros), spec, block)


def _params(w: Tensor, spec: WeightSpec, block: tuple, grid) -> QParams:
    """Block params of ``w`` from the spec's observer."""
    lo, hi = observe(to_blocks(w, block), spec.observer, grid)
    return choose_qparams(lo, hi, grid)


def _empty_params(block: tuple, n_out: int, n_in: int, grid, spec: WeightSpec) -> tuple:
    rows, cols = n_out // block[0], n_in // block[1]
    scales = torch.ones(rows, cols, dtype=grid.scale_dtype)
    zeros = None
    if spec.has_zero:
        zdtype = grid.scale_dtype if spec.zero_point == "float" else torch.uint8
        zeros = torch.zeros(rows, cols, dtype=zdtype)
    return scales, zeros


def _column_params(scales: Tensor, zeros: Tensor | None, g: int, block: tuple) -> QParams:
    """Params of one column: a (out,) or (1,) slice of the group's params."""
    zero = None if zeros is None else zeros[:, g]
    return QParams(scales[:, g], zero)


def _inverse_hessian_factor(h: Tensor, damp: float, layer: str) -> Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)^-1, raising damp until it exists."""
    mean_diag = torch.diagonal(h).mean()
    for _ in range(6):
        damped = h.clone()  # H + damp·mean·I, without an (in, in) identity in memory
        damped.diagonal().add_(damp * mean_diag)
        low, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(low)
            del low
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        log.warning("%s: Hessian not positive definite at damp %.3g; retrying with %.3g",
                    layer or "layer", damp, damp * 10)  # fmt: skip
        damp *= 10
    raise LowbitError(f"{layer}: Hessian could not be factorised even with damp {damp:.3g}")

"""Block handlers for the calibrated algorithms, run by the sequential block runner.

Each handler quantizes the linears of one block that the plan covers, sets each linear's weight
to its quantized value (so the runner's next pass sees the quantized block) and records the
:class:`QuantizedWeight` for packing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.algorithms import with_lorc
from lowbit.algorithms.awq import AWQOptions, search_scales
from lowbit.algorithms.clip import output_error_range
from lowbit.algorithms.gptq import GPTQOptions, gptq
from lowbit.algorithms.kmeans import kmeans
from lowbit.algorithms.smoothquant import SmoothQuantOptions, search_alpha
from lowbit.calibration import BlockContext, module_output
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.families import Family
from lowbit.models.fold import can_fold, fold_scales
from lowbit.primitives import QuantizedWeight, quantize_weight
from lowbit.sysinfo import release_freed_memory

log = logging.getLogger(__name__)


def apply(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Fit the LoRC correction the spec asks for (against the float weight, after any AWQ
    scaling), then give ``linear`` the weight the layer will compute with, so the next block
    is calibrated on the outputs of the corrected layer."""
    with torch.no_grad():
        with_lorc(qw, linear.weight)
        linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))


def hessian_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    groups: list[list[str]],
    fit: Callable[[Tensor, Tensor, WeightSpec, str], QuantizedWeight],
    out: dict[str, QuantizedWeight],
) -> None:
    """Quantize each group of the block's linears with ``fit(weight, hessian, spec, name)``,
    re-measuring the input Hessians after each group (true-sequential order)."""
    for group in groups:
        names = [n for n in group if n in plan]
        if not names:
            continue
        stats = ctx.collect(names, hessian=True)
        for name in names:
            linear, full = ctx.linear(name), f"{ctx.name}.{name}"
            hessian = stats.pop(name).hessian()  # the float64 sums are freed before the fit
            qw = fit(linear.weight, hessian, plan[name], full)
            del hessian
            apply(linear, qw)
            out[full] = qw
            release_freed_memory()  # the fit's workspace, before the next layer's


def gptq_fit(options: GPTQOptions) -> Callable[[Tensor, Tensor, WeightSpec, str], QuantizedWeight]:
    """GPTQ as a ``hessian_block`` fit."""
    return lambda w, h, spec, name: gptq(w, h, spec, options, name)


def kmeans_fit(w: Tensor, h: Tensor, spec: WeightSpec, name: str) -> QuantizedWeight:
    """K-means codebooks weighted by each input's mean squared activation (diag of XᵀX)."""
    return kmeans(w, spec, h.diagonal(), name)


def clipped_rtn_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    groups: list[list[str]],
    options: AWQOptions,
    out: dict[str, QuantizedWeight],
) -> None:
    """Round-to-nearest with (optionally) output-error clipping of each group's range."""
    for group in groups:
        names = [n for n in group if n in plan]
        if not names:
            continue
        stats = ctx.collect(names, hessian=True) if options.clip else {}
        for name in names:
            linear, full, spec = ctx.linear(name), f"{ctx.name}.{name}", plan[name]
            lo = hi = None
            if options.clip:
                hessian = stats[name].hessian()
                lo, hi = output_error_range(
                    linear.weight, hessian, spec, options.clip_steps, options.clip_max_shrink
                )
            qw = quantize_weight(linear.weight, spec, full, lo, hi)
            apply(linear, qw)
            out[full] = qw


def awq_scale_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    family: Family,
    options: AWQOptions,
    batch_size: int,
) -> dict[str, float | None]:
    """Search and fold AWQ scales for every scale group of the block; returns α per group
    (None where no scaling won)."""
    chosen = {}
    max_calls = max(1, math.ceil(options.search_samples / batch_size))
    for group in family.scale_groups:
        names = [n for n in group.linears if n in plan]
        linears = [ctx.linear(n) for n in names]
        prev = ctx.block.get_submodule(group.prev)
        if len(names) != len(group.linears) or not can_fold(prev, group.prev_kind, linears):
            log.debug("%s: no AWQ scaling for %s", ctx.name, group.linears)
            continue
        stats = ctx.collect(names, absmean=True)
        inspect = ctx.block.get_submodule(group.inspect)
        inputs = ctx.module_inputs(group.inspect, max_calls)
        with torch.no_grad():
            reference = [module_output(inspect, a, k) for a, k in inputs]
        originals = [lin.weight.detach().clone() for lin in linears]
        loss = _ModuleLoss(linears, inspect, inputs, reference)
        specs = [plan[n] for n in names]
        s, alpha, _ = search_scales(stats[names[0]].absmean(), originals, specs, loss, options)
        with torch.no_grad():
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(w)
        fold_scales(prev, group.prev_kind, linears, s)
        chosen[f"{ctx.name}.{group.prev}"] = alpha
    return chosen


class _ModuleLoss:
    """Mean squared output error of ``inspect`` when ``linears`` hold the given weights."""

    def __init__(self, linears: list[nn.Linear], inspect: nn.Module, inputs: list, reference: list):
        self.linears, self.inspect, self.inputs, self.reference = (
            linears,
            inspect,
            inputs,
            reference,
        )

    @torch.no_grad()
    def __call__(self, effective: list[torch.Tensor]) -> float:
        for lin, w in zip(self.linears, effective, strict=True):
            lin.weight.copy_(w.to(lin.weight.dtype))
        total = 0.0
        for (args, kwargs), ref in zip(self.inputs, self.reference, strict=True):
            total += float((module_output(self.inspect, args, kwargs) - ref).double().pow(2).mean())
        return total / len(self.inputs)


def smooth_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    family: Family,
    act: ActivationSpec | None,
    options: SmoothQuantOptions,
) -> dict[str, float | None]:
    """Choose and fold SmoothQuant factors for every scale group of the block whose linears are
    all planned and whose feeding module can absorb them; returns α per group (None: none won).
    """
    groups = []
    for group in family.scale_groups:
        names = [n for n in group.linears if n in plan]
        prev = ctx.block.get_submodule(group.prev)
        linears = [ctx.linear(n) for n in names]
        if len(names) == len(group.linears) and can_fold(prev, group.prev_kind, linears):
            groups.append((group, names, prev, linears))
    if not groups:
        return {}
    # folding leaves the float block's computation unchanged, so one pass serves every group
    stats = ctx.collect([names[0] for _, names, _, _ in groups], absmax=True)
    chosen = {}
    for group, names, prev, linears in groups:
        x = _sample_rows(ctx.module_inputs(names[0], 1)[0][0][0], options.search_rows)
        weights = [lin.weight.detach() for lin in linears]
        specs = [plan[n] for n in names]
        s, alpha = search_alpha(x, stats[names[0]].absmax(), weights, specs, act, options)
        if s is not None:
            fold_scales(prev, group.prev_kind, linears, s)
        chosen[f"{ctx.name}.{group.prev}"] = alpha
    return chosen


def _sample_rows(x: Tensor, rows: int) -> Tensor:
    """Up to ``rows`` evenly spaced rows of ``x`` (..., in), float32."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    step = max(1, flat.shape[0] // rows)
    return flat[::step][:rows]

"""Block handlers for the calibrated algorithms, run by the sequential block runner.

Each handler quantizes the linears of one block that the plan covers, sets each linear's weight
to its quantized value (so the runner's next pass sees the quantized block) and records the
:class:`QuantizedWeight` for packing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor, nn

from lowbit.algorithms import with_lorc
from lowbit.algorithms.awq import AWQOptions, search_scales
from lowbit.algorithms.clip import output_error_range
from lowbit.algorithms.gptq import GPTQOptions, gptq
from lowbit.algorithms.kmeans import kmeans
from lowbit.algorithms.smoothquant import SmoothQuantOptions, output_error, search_alpha
from lowbit.calibration import BlockContext, module_output
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.families import Family
from lowbit.models.fold import can_fold, fold_scales
from lowbit.primitives import QParams, QuantizedWeight, quantize_weight
from lowbit.sysinfo import release_freed_memory

log = logging.getLogger(__name__)


def fit_cost(linear: nn.Linear) -> float:
    """Relative cost of fitting one linear (GPTQ: in²·out for the updates, in³ for the
    inverse), what the ranks split a block's linears by."""
    n = float(linear.in_features)
    return n * n * (n + linear.out_features)


def owners(ctx: BlockContext, names: list[str]) -> dict[str, int]:
    """name -> the rank that quantizes that linear (every name: rank 0 in one process)."""
    return ctx.group.owners({n: fit_cost(ctx.linear(n)) for n in names})


def fitted(
    ctx: BlockContext, names: list[str], fit: Callable[[str], QuantizedWeight],
    by: dict[str, int] | None = None,
) -> Iterator[tuple[str, QuantizedWeight]]:  # fmt: skip
    """(name, ``fit(name)``) for each of ``names`` in order, on every rank: each rank fits the
    linears it owns (``by``, default :func:`owners`) first, then the results are shared. One
    process fits, and hands over, one linear at a time (one result held at a time)."""
    if not ctx.group.distributed:
        for name in names:
            yield name, fit(name)
            release_freed_memory()  # the fit's workspace, before the next layer's
        return
    by = by or owners(ctx, names)
    done = {}
    for name in names:
        if by[name] == ctx.group.rank:
            done[name] = fit(name)
            release_freed_memory()  # the fit's workspace, before the next layer's
    for name in names:
        yield name, share_weight(ctx, done.pop(name, None), by[name])


def owned(
    ctx: BlockContext,
    names: list[str],
    fit: Callable[[str], QuantizedWeight],
    out: dict[str, QuantizedWeight],
    by: dict[str, int] | None = None,
) -> None:
    """Quantize ``names`` with ``fit(name)`` and the LoRC correction the spec asks for (fitted
    against the float weight, after any AWQ scaling), each on its owner rank; then every
    linear computes with its quantized weight, so the next block is calibrated on the outputs
    of the corrected layers, and ``out`` keeps the results."""

    def corrected(name: str) -> QuantizedWeight:
        return with_lorc(fit(name), ctx.linear(name).weight)

    for name, qw in fitted(ctx, names, corrected, by):
        with torch.no_grad():
            linear = ctx.linear(name)
            linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))
        out[f"{ctx.name}.{name}"] = qw


def share_weight(ctx: BlockContext, qw: QuantizedWeight | None, owner: int) -> QuantizedWeight:
    """``qw`` from rank ``owner`` on every rank (its codes, scales, zeros, LoRC and spec)."""
    if not ctx.group.distributed:
        return qw
    tensors = None
    if qw is not None:
        spec = json.dumps(qw.spec.to_dict()).encode()
        tensors = {"codes": qw.codes, "block": torch.tensor(qw.block, dtype=torch.int64),
                   "spec": torch.frombuffer(bytearray(spec), dtype=torch.uint8)}  # fmt: skip
        for key, t in (("scale", qw.qparams.scale), ("zero", qw.qparams.zero)):
            if t is not None:
                tensors[key] = t
        if qw.lorc is not None:
            tensors["lorc_u"], tensors["lorc_v"] = qw.lorc
    got = ctx.group.broadcast(tensors, owner)
    if qw is not None:
        return qw
    spec = WeightSpec.from_dict(json.loads(bytes(got["spec"].tolist())))
    lorc = (got["lorc_u"], got["lorc_v"]) if "lorc_u" in got else None
    qp = QParams(got.get("scale"), got.get("zero"))
    return QuantizedWeight(got["codes"], qp, spec, tuple(got["block"].tolist()), lorc)


def hessian_block(
    ctx: BlockContext,
    plan: dict[str, WeightSpec],
    groups: list[list[str]],
    fit: Callable[[Tensor, Tensor, WeightSpec, str], QuantizedWeight],
    out: dict[str, QuantizedWeight],
) -> None:
    """Quantize each group of the block's linears with ``fit(weight, hessian, spec, name)``,
    re-measuring the input Hessians after each group (true-sequential order). Under a process
    group each Hessian is summed on the rank that fits its linear."""
    for group in groups:
        names = [n for n in group if n in plan]
        if not names:
            continue
        by = owners(ctx, names)
        stats = ctx.collect(names, hessian=True, owners=by)

        def one(name: str, stats: dict = stats) -> QuantizedWeight:
            hessian = stats.pop(name).hessian()  # the float64 sums are freed before the fit
            return fit(ctx.linear(name).weight, hessian, plan[name], f"{ctx.name}.{name}")

        owned(ctx, names, one, out, by)


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
        by = owners(ctx, names)
        stats = ctx.collect(names, hessian=True, owners=by) if options.clip else {}

        def one(name: str, stats: dict = stats) -> QuantizedWeight:
            linear, full, spec = ctx.linear(name), f"{ctx.name}.{name}", plan[name]
            lo = hi = None
            if options.clip:
                hessian = stats.pop(name).hessian()
                lo, hi = output_error_range(
                    linear.weight, hessian, spec, options.clip_steps, options.clip_max_shrink
                )
            return quantize_weight(linear.weight, spec, full, lo, hi)

        owned(ctx, names, one, out, by)


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
    experts: tuple[dict, dict] | None = None  # statistics and inputs of every expert's group
    for group in family.scale_groups:
        names = [n for n in group.linears if n in plan]
        linears = [ctx.linear(n) for n in names]
        prev = ctx.block.get_submodule(group.prev)
        if len(names) != len(group.linears) or not can_fold(prev, group.prev_kind, linears):
            log.debug("%s: no AWQ scaling for %s", ctx.name, group.linears)
            continue
        if _routed(linears):  # a mixture's experts: one pass for all (folding one expert's
            if experts is None:  # scales changes no other expert's inputs)
                experts = _experts_inputs(ctx, family, plan, max_calls)
            stats, inputs = experts[0], experts[1][group.inspect]
        else:
            stats = ctx.collect(names, absmean=True)
            inputs = ctx.module_inputs(group.inspect, max_calls)
        if stats[names[0]].rows == 0:  # an expert no calibration token reached, on any rank
            continue
        inspect = ctx.block.get_submodule(group.inspect)
        with torch.no_grad():
            reference = [module_output(inspect, a, k) for a, k in inputs]
        originals = [lin.weight.detach().clone() for lin in linears]
        loss = _ModuleLoss(ctx, linears, inspect, inputs, reference, max_calls)
        specs = [plan[n] for n in names]
        s, alpha, _ = search_scales(stats[names[0]].absmean(), originals, specs, loss, options)
        with torch.no_grad():
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(w)
        s, alpha = _decided(ctx, s, alpha)
        fold_scales(prev, group.prev_kind, linears, s)
        chosen[f"{ctx.name}.{group.prev}"] = alpha
    return chosen


def _routed(linears: list[nn.Module]) -> bool:
    return all(getattr(lin, "lowbit_routed", False) for lin in linears)


def _experts_inputs(ctx: BlockContext, family: Family, plan: dict[str, WeightSpec],
                    max_calls: int) -> tuple[dict, dict]:  # fmt: skip
    """The input statistics of every expert's AWQ group and its inspected module's inputs,
    each in one calibration pass."""
    groups = [
        g for g in family.scale_groups
        if all(n in plan for n in g.linears) and _routed([ctx.linear(n) for n in g.linears])
    ]  # fmt: skip
    stats = ctx.collect([n for g in groups for n in g.linears], absmean=True)
    return stats, ctx.modules_inputs([g.inspect for g in groups], max_calls)


def _decided(ctx: BlockContext, s: Tensor | None, alpha: float | None):
    """Rank 0's scales and α on every rank (all ranks searched on the same reduced figures;
    this makes ranks on differing CPUs agree too)."""
    if not ctx.group.distributed:
        return s, alpha
    mine = {"alpha": torch.tensor([math.nan if alpha is None else alpha], dtype=torch.float64)}
    if s is not None:
        mine["s"] = s
    got = ctx.group.broadcast(mine, 0)
    a = float(got["alpha"][0])
    return got.get("s"), None if math.isnan(a) else a


class _ModuleLoss:
    """Mean squared output error of ``inspect`` when ``linears`` hold the given weights, over
    the job's first ``batches`` batches (this rank's share of them in ``inputs``)."""

    def __init__(self, ctx: BlockContext, linears: list[nn.Linear], inspect: nn.Module,
                 inputs: list, reference: list, batches: int) -> None:  # fmt: skip
        self.ctx, self.linears, self.inspect = ctx, linears, inspect
        self.inputs, self.reference = inputs, reference
        self.batches = min(batches, len(ctx.sizes))

    @torch.no_grad()
    def __call__(self, effective: list[torch.Tensor]) -> float:
        for lin, w in zip(self.linears, effective, strict=True):
            lin.weight.copy_(w.to(lin.weight.dtype))
        losses = [
            float((module_output(self.inspect, args, kwargs) - ref).double().pow(2).mean())
            for (args, kwargs), ref in zip(self.inputs, self.reference, strict=True)
        ]
        return self.ctx.total(losses, self.batches) / self.batches


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
    routed = [names[0] for _, names, _, linears in groups if _routed(linears)]
    firsts = ctx.modules_inputs(routed, 1) if routed else {}  # the first batch, one pass
    chosen = {}
    for group, names, prev, linears in groups:
        if stats[names[0]].rows == 0:  # an expert no calibration token reached
            continue
        first = firsts[names[0]] if names[0] in firsts else ctx.module_inputs(names[0], 1)
        x = _sample_rows(first[0][0][0], options.search_rows) if first else None
        weights = [lin.weight.detach() for lin in linears]
        specs = [plan[n] for n in names]
        s = alpha = None
        if ctx.group.main and x is not None:  # (an expert the first batch does not reach: none)
            error = partial(output_error, x, weights, specs, act)  # error(s)
            s, alpha = search_alpha(stats[names[0]].absmax(), weights, options, error)
        s, alpha = _decided(ctx, s, alpha)
        if s is not None:
            fold_scales(prev, group.prev_kind, linears, s)
        chosen[f"{ctx.name}.{group.prev}"] = alpha
    return chosen


def _sample_rows(x: Tensor, rows: int) -> Tensor:
    """Up to ``rows`` evenly spaced rows of ``x`` (..., in), float32."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    step = max(1, flat.shape[0] // rows)
    return flat[::step][:rows]

"""The LKD block step: train each quantized block to match its float outputs, then re-pack.

Run by the sequential runner after the weight algorithm has quantized the block. The block's
planned linears are swapped for :class:`FakeQuantLinear` twins started from the algorithm's
codes and scales (and the recipe's activation rounding), trained with
:func:`lowbit.algorithms.lkd.distill` on the block's calibration inputs against the float
block's outputs (recorded before quantization), and swapped back as plain linears holding the
trained grid's weights, whose packed codes replace the algorithm's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.algorithms.lkd import LKDOptions, distill, trainable
from lowbit.calibration import BlockContext, block_output
from lowbit.calibration.group import Group
from lowbit.formats.spec import ActivationSpec
from lowbit.models.modules import set_module
from lowbit.nn.fake_linear import FakeQuantLinear, trains
from lowbit.pipeline.calibrated import share_weight
from lowbit.primitives import QuantizedWeight

log = logging.getLogger(__name__)


def lkd_block(
    ctx: BlockContext,
    targets: list[Tensor],
    results: dict[str, QuantizedWeight],
    act: ActivationSpec | None,
    options: LKDOptions,
    progress: bool = True,
) -> dict[str, float]:
    """Distil the block's quantized linears (those in ``results``) towards ``targets`` (the
    float block's outputs, one per calibration call); updates ``results`` and the linears.
    Returns the relative output loss before and after."""
    prefix = ctx.name + "."
    local = {n[len(prefix) :]: qw for n, qw in results.items() if n.startswith(prefix)}
    kept = [n for n, qw in local.items() if not trains(qw.spec) or qw.lorc is not None]
    if kept:  # fp16 / nf4 / integer-zero / LoRC layers (a mixed plan's): left as quantized
        log.info("lkd %s: %d of %d layers kept as they are (no grid it trains: %s)", ctx.name,
                 len(kept), len(local), ", ".join(kept))  # fmt: skip
        local = {n: qw for n, qw in local.items() if n not in kept}

    def make(name: str, linear: nn.Linear) -> FakeQuantLinear:
        return FakeQuantLinear.from_quantized(linear, local[name], prefix + name, act)

    def train(fakes: list[FakeQuantLinear], student, mean, sync, _agree) -> tuple[float, float]:
        groups = trainable(fakes, options.train, options.lr)
        return distill(groups, student, targets, options.steps, f"lkd {ctx.name}", progress,
                       mean, sync)  # fmt: skip

    return train_block(ctx, list(local), make, train, results)


def train_block(
    ctx: BlockContext,
    names: list[str],
    make: Callable[[str, nn.Linear], nn.Module],
    train: Callable[..., tuple[float, float]],
    results: dict[str, QuantizedWeight],
) -> dict[str, float]:
    """Swap the block's linears ``names`` for trainable twins (``make(name, linear)``), run
    ``train(twins, student, mean, sync, agree)`` (``student(i)``: the block's output on
    calibration call i; ``mean``, ``sync``, ``agree``: what :func:`distill` takes to train on
    every rank's data), put the linears back holding each twin's packed weight (``to_quantized()``,
    rank 0's under a process group) and record it in ``results``. Returns the loss before and
    after."""
    if not names:
        return {}
    prefix = ctx.name + "."
    linears: dict[str, nn.Linear] = {n: ctx.linear(n) for n in names}
    twins = {n: make(n, linears[n]) for n in names}
    for p in ctx.block.parameters():
        p.requires_grad_(False)
    for name, twin in twins.items():
        set_module(ctx.block, name, twin)
    batches = len(ctx.sizes)
    try:
        first, last = train(
            list(twins.values()),
            lambda i: block_output(ctx.block, ctx.calls[i]),
            lambda losses: ctx.total(losses, batches) / batches,
            functools.partial(_average, ctx.group),
            functools.partial(_agree, ctx.group),
        )
    finally:
        for name, linear in linears.items():
            set_module(ctx.block, name, linear)
    with torch.no_grad():
        for name, twin in twins.items():
            qw = share_weight(ctx, twin.to_quantized() if ctx.group.main else None, 0)
            linears[name].weight.copy_(qw.dequantize().to(linears[name].weight.dtype))
            results[prefix + name] = qw
    return {"loss_before": first, "loss_after": last}


def _agree(group: Group, value: float) -> float:
    """The mean of ``value`` over the ranks (itself in one process)."""
    if not group.distributed:
        return value
    return float(group.sum(torch.tensor([value], dtype=torch.float64))[0]) / group.world


def _average(group: Group, grads: list[Tensor]) -> None:
    """Data-parallel LKD: every rank steps with the mean gradient of all ranks' batches."""
    if group.distributed:
        for g in grads:
            group.sum(g).div_(group.world)

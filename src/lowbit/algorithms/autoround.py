"""Learned rounding (AutoRound; Cheng et al., "Optimize Weight Rounding via Signed Gradient
Descent for the Quantization of LLMs", 2023).

Each decoder block's linears keep their float weights; what is learned, per block and towards
the float block's outputs on the calibration windows, is whether each weight rounds up or
down (an offset in [-0.5, 0.5] grid steps added before rounding) and how far each group's
range is clipped (factors in [0.5, 1] on its minimum and maximum). The update is the sign of
the gradient times a learning rate that decays linearly to zero, so every parameter moves by
at most ``lr`` per step whatever the gradient's scale; the step with the lowest loss (relative
to round-to-nearest's on the same windows) is kept.
The modules are :class:`lowbit.nn.learned_round.LearnedRoundLinear`; the loop is
:func:`lowbit.algorithms.lkd.distill`; the pipeline's block step is
:mod:`lowbit.pipeline.autoround`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class AutoRoundOptions:
    """The paper's defaults: ``iters`` 200 sign-SGD steps per block, ``lr`` (offsets, grid
    steps per step) 1/iters, ``minmax_lr`` (range factors) the same, ``batch_size`` 8
    calibration windows per step; ``minmax`` false learns the offsets only."""

    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    minmax: bool = True

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise LowbitError("autoround: iters and batch_size must be >= 1")
        for key in ("lr", "minmax_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise LowbitError(
                    f"autoround.{key} must be a finite number > 0 (or left out), got {value}"
                )

    @property
    def offset_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters

    @property
    def range_lr(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.offset_lr


class SignSGD(torch.optim.Optimizer):
    """``p -= lr · sign(grad)``. Written here because torch.optim has no sign-gradient
    optimiser; the update is one line."""

    def __init__(self, params: Iterable, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def parameter_groups(modules: Sequence[nn.Module], options: AutoRoundOptions) -> list[dict]:
    """SignSGD groups for LearnedRoundLinear modules: the offsets at ``lr``, the range
    factors (unless ``minmax`` is off) at ``minmax_lr``; gradients switched on."""
    shifts = [m.shift.requires_grad_(True) for m in modules]
    groups = [{"params": shifts, "lr": options.offset_lr}]
    if options.minmax:
        ranges = [p.requires_grad_(True) for m in modules for p in (m.low, m.high)]
        groups.append({"params": ranges, "lr": options.range_lr})
    return groups


def linear_decay(iters: int):
    """The learning-rate schedule: linear from the full rate to zero over ``iters`` steps."""
    return lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=iters)

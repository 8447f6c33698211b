"""Layer-wise knowledge distillation (LKD, ZeroQuant; Yao et al., 2022).

After a decoder block is quantized, its quantized twin (fake-quant linears: straight-through
rounding, learnable scales) is trained for a few steps to reproduce the float block's outputs on
the same inputs, the calibration activations. It needs no labels and no original training data:
the teacher is the block itself before quantization. The core here is the training loop; the
pipeline supplies the student forward pass and the targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

Trainable = Literal["all", "weights", "scales"]


@dataclass(frozen=True)
class LKDOptions:
    """``steps`` Adam steps per block, ``batch_size`` calibration windows per step, ``lr`` in grid
    steps (see :func:`trainable`);
    ``train``: which parameters learn: ``all`` (weights through the straight-through estimator,
    scales and offsets with the exact gradient), ``weights`` or ``scales`` (the codes still
    change as the grid moves).

    The defaults (all, 1% of a grid step per step) were chosen on smollm2-135m W4A8 g64
    (32 bbc windows, 32 steps; wiki 8,192 tokens; no LKD: ppl 29.93): scales only 26.71, all
    24.98; all at 3% of a step 30.91 (too fast: codes flip back and forth)."""

    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 2
    train: Trainable = "all"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LowbitError("lkd: steps and batch_size must be >= 1 and lr > 0")
        if self.train not in Trainable.__args__:
            raise LowbitError(f"lkd.train must be one of {', '.join(Trainable.__args__)}, "
                              f"not {self.train!r}")  # fmt: skip


def trainable(fakes: Sequence[nn.Module], train: Trainable, lr: float) -> list[dict]:
    """Adam parameter groups for the FakeQuantLinear parameters ``train`` selects (gradients
    switched on). Each layer's learning rate is ``lr`` times its mean grid step, so that ``lr``
    is the fraction of a grid step a weight, offset or scale may move per step on any model:
    Adam's steps have the size of the learning rate whatever the gradient's scale."""
    groups = []
    for fake in fakes:
        chosen = {"weights": [fake.weight], "scales": [fake.scale, fake.offset]}.get(train)
        params = []
        for p in chosen or [fake.weight, fake.scale, fake.offset]:
            if p is fake.offset and fake.spec.symmetric:
                continue
            p.requires_grad_(True)
            params.append(p)
        step = float(fake.scale.detach().abs().mean())
        groups.append({"params": params, "lr": lr * step})
    return groups


def distill(
    groups: list[dict],
    student: Callable[[int], Tensor],
    targets: Sequence[Tensor],
    steps: int,
    desc: str = "lkd",
    progress: bool = True,
    mean: Callable[[list[float]], float] | None = None,
    sync: Callable[[list[Tensor]], None] | None = None,
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] = torch.optim.Adam,
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    project: Callable[[], None] | None = None,
    keep_best: bool = False,
    agree: Callable[[float], float] | None = None,
) -> tuple[float, float]:
    """Minimise ||student(i) − targets[i]||² / ||targets[i]||² over the samples in turn, for
    ``steps`` steps of ``optimizer`` (Adam by default; ``schedule`` its learning rate, stepped
    once a step); ``project`` puts the parameters back in their limits after each step;
    ``keep_best`` ends on the parameters of the step with the lowest loss relative to the
    starting loss on the same sample (AutoRound keeps its lowest-loss step; dividing by the
    sample's starting loss compares steps made on different samples fairly: an easy sample
    would otherwise pass for a good step); under data-parallel training ``agree`` turns each
    worker's ratio into one all workers share (their mean), so that all keep the same step.

    Returns the mean loss over all samples before and after training. If training did not
    lower it (too high a learning rate, too few steps), the parameters are put back as they
    were, so training never leaves a block worse on its calibration data. Data-parallel training
    passes ``mean`` (per-sample losses -> the mean over every worker's samples) and ``sync``
    (averages the gradients over workers in place, before each step).
    """
    mean = mean or (lambda losses: sum(losses) / len(losses))
    start = _losses(student, targets)
    before = mean(start)
    params = [p for g in groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    best, best_ratio = None, math.inf
    opt = optimizer(groups)
    scheduler = schedule(opt) if schedule is not None else None
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not progress)
    with torch.enable_grad():
        for step in bar:
            i = step % len(targets)
            loss = _loss(student(i), targets[i])
            if not torch.isfinite(loss):
                raise LowbitError(f"{desc}: the loss became {loss.item()}; lower the learning rate")
            ratio = loss.item() / max(start[i], 1e-30)
            if keep_best and agree is not None:
                ratio = agree(ratio)
            if keep_best and ratio < best_ratio:
                best_ratio, best = ratio, [p.detach().clone() for p in params]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync is not None:
                _sync_all(params, sync)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            if project is not None:
                project()
            losses.append(loss.item())
            window = losses[-10:]
            bar.set_postfix(loss=f"{before:.3e}->{sum(window) / len(window):.3e}")
    if best is not None:
        _restore(params, best)
    after = mean(_losses(student, targets))
    if not after < before:
        _restore(params, saved)
        after = before
    return before, after


@torch.no_grad()
def _sync_all(params: list[Tensor], sync: Callable[[list[Tensor]], None]) -> None:
    """Average every parameter's gradient over the workers, the same list on each: a
    parameter this worker's batch did not reach (an expert no token was routed to) sends
    zeros; one that no worker reached (its mean gradient all zero) takes no optimizer step on
    any worker, as a single process would leave it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sync([p.grad for p in params])
    for p in params:
        if not p.grad.any():
            p.grad = None


@torch.no_grad()
def _restore(params: list[Tensor], values: list[Tensor]) -> None:
    for p, old in zip(params, values, strict=True):
        p.copy_(old)


def _loss(y: Tensor, target: Tensor) -> Tensor:
    return (y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def _losses(student: Callable[[int], Tensor], targets: Sequence[Tensor]) -> list[float]:
    return [float(_loss(student(i), t)) for i, t in enumerate(targets)]

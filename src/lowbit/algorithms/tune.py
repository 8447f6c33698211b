"""End-to-end tuning of the quantization parameters (EfficientQAT's E2E-QP; Chen et al. 2024),
distilled from the float model.

Once every layer is quantized, the integer codes stay fixed and only each group's scale (and
offset, on asymmetric grids) is trained, through the whole model at once, so that the quantized
model's next-token distribution matches the float model's on the calibration windows
(KL(float ‖ quantized), which needs no labels: the teacher is the model itself before
quantization). Block-wise methods (GPTQ, AWQ, AutoRound, LKD) each fit one block to its own
float outputs; this step corrects what their errors add up to across blocks. It trains a few
parameters per group (a 4.5-bit model has one scale and one offset per 64 weights), so one pass
over the calibration windows does not overfit them, and the packed layout does not change.

The loop is here; the model swap (codes held fixed in
:class:`lowbit.nn.fake_linear.FakeQuantLinear`) is :mod:`lowbit.pipeline.tune`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class TuneOptions:
    """``steps`` AdamW steps of ``batch_size`` calibration windows each (one pass over 128
    windows by default), ``lr`` the fraction of a layer's mean grid step a scale or offset may
    move per step (Adam's steps have the size of the learning rate; decayed linearly to zero),
    ``holdout`` calibration windows kept out of training to check the result: if their KL did
    not fall, the scales are put back as they were.

    The defaults were measured on smollm2-135m int4 g64 GPTQ with the folded and online
    Hadamard rotation (``w4-g64-best``; README, "End-to-end tuning")."""

    steps: int = 64
    batch_size: int = 2
    lr: float = 5e-4
    holdout: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.holdout < 1:
            raise LowbitError("tune: steps, batch_size and holdout must be >= 1")
        if not 0 < self.lr < 1:
            raise LowbitError(f"tune: lr is a fraction of a grid step per step, in (0, 1); "
                              f"got {self.lr}")  # fmt: skip

    def windows_needed(self) -> int:
        """Calibration windows a run needs: the held-out ones and at least one batch."""
        return self.holdout + self.batch_size

    def check_windows(self, n: int) -> None:
        """A one-line error when ``n`` calibration windows are too few."""
        if n < self.windows_needed():
            raise LowbitError(f"tune needs at least {self.windows_needed()} calibration windows "
                              f"({self.holdout} held out + a batch of {self.batch_size}), got "
                              f"{n}; give more --calib-samples")  # fmt: skip


def kl_to(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean KL(teacher ‖ student) per token over (B, T, V) logits, in float32."""
    ref = F.log_softmax(teacher_logits.float(), -1)
    logp = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1).mean()


def tune_end_to_end(
    groups: list[dict],
    student: Callable[[Tensor], Tensor],
    teacher: Callable[[Tensor], Tensor],
    windows: Tensor,
    options: TuneOptions,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``groups`` (AdamW parameter groups) so that ``student(ids)``'s logits match
    ``teacher(ids)``'s on ``windows`` (N, T); the last ``options.holdout`` windows only check
    the result. Returns the held-out KL before and after (after = before when training did not
    lower it and the parameters were put back)."""
    options.check_windows(len(windows))
    train, check = windows[: -options.holdout], windows[-options.holdout :]
    params = [p for g in groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    before = _held_out(student, teacher, check)
    losses: list[float] = []
    bar = tqdm(range(options.steps), desc="tune (end to end)", unit="step",
               disable=not progress)  # fmt: skip
    try:
        _train(groups, student, teacher, train, options, bar, losses)
    except BaseException:  # a failed or interrupted run leaves the parameters as they were
        _restore(params, saved)
        raise
    after = _held_out(student, teacher, check)
    if not after < before:
        _restore(params, saved)
        after = before
    return {"held_out_kl_before": before, "held_out_kl_after": after,
            "first_loss": losses[0], "last_loss": sum(losses[-8:]) / len(losses[-8:])}  # fmt: skip


def _train(groups: list[dict], student: Callable[[Tensor], Tensor],
           teacher: Callable[[Tensor], Tensor], train: Tensor, options: TuneOptions, bar,
           losses: list[float]) -> None:  # fmt: skip
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / options.steps)
    with torch.enable_grad():
        for step in bar:
            at = (step * options.batch_size + torch.arange(options.batch_size)) % len(train)
            ids = train[at]
            with torch.no_grad():
                target = teacher(ids)
            loss = kl_to(target, student(ids))
            if not torch.isfinite(loss):
                raise LowbitError(f"tune: the loss became {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{sum(losses[-8:]) / len(losses[-8:]):.4f}")


@torch.no_grad()
def _restore(params: list[Tensor], values: list[Tensor]) -> None:
    for p, old in zip(params, values, strict=True):
        p.copy_(old)


@torch.no_grad()
def _held_out(student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor],
              windows: Tensor) -> float:  # fmt: skip
    kls = [float(kl_to(teacher(w[None]), student(w[None]))) for w in windows]
    return sum(kls) / len(kls)


__all__ = ["TuneOptions", "kl_to", "tune_end_to_end"]

"""Per-step activation ranges: which calibrated range a layer uses during a sampling loop.

A diffusion model's layers see inputs whose range changes with the timestep (Q-Diffusion,
PTQ4DM). A static layer with ``activations.step_groups: G`` keeps G calibrated ranges, one per
equal slice of the timestep axis; the sampler says where it is before each denoising call with
:func:`select_step` (``t / num_train_timesteps``), and each such layer then uses the range of
the slice holding that position. Layers with one range ignore it.
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.primitives import QParams


def select_step(model: nn.Module, position: float | None) -> None:
    """Tell every layer of ``model`` with per-step ranges that the next forward is at
    ``position`` in [0, 1] of the timestep axis (``t / num_train_timesteps``); None: at no
    step (a layer with several ranges then refuses to run)."""
    if position is not None and not 0.0 <= position <= 1.0:
        raise LowbitError(f"select_step: position must be in [0, 1] (t / timesteps), got "
                          f"{position}")  # fmt: skip
    for module in model.modules():
        if hasattr(module, "step_position"):
            module.step_position = position


def step_group(position: float | None, groups: int, layer: str = "") -> int:
    """The range a layer with ``groups`` per-step ranges uses at ``position``."""
    if groups == 1:
        return 0
    if position is None:
        raise LowbitError(f"{layer or 'a layer'}: it has {groups} activation ranges, one per "
                          f"slice of the timestep axis; call lowbit.nn.select_step(model, "
                          f"t / timesteps) before each denoising step")  # fmt: skip
    return min(groups - 1, int(position * groups))


def current_range(scale: Tensor, zero: Tensor | None, position: float | None,
                  layer: str = "") -> QParams:  # fmt: skip
    """The static (scale, zero) of a layer's ``scale`` / ``zero`` ranges (one per step group)
    that applies at ``position``."""
    g = step_group(position, scale.numel(), layer)
    return QParams(scale[g : g + 1], None if zero is None else zero[g : g + 1])


__all__ = ["current_range", "select_step", "step_group"]

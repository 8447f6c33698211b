"""The inputs of a model whose forward takes more than one tensor.

A bare diffusion UNet is called as ``unet(sample, timestep, encoder_hidden_states=text)``; a
class-conditional generator as ``g(z, labels)``. :class:`ModelInputs` holds such calls' tensors,
positional and by keyword, each with the samples along dim 0, and splits and slices them the way
a tensor of token windows or images is split into calibration batches, so every calibration pass
(GPTQ Hessians, SmoothQuant/AWQ statistics, static ranges, diagnostics) takes them unchanged.

For a diffusion model's per-step activation ranges (``activations.step_groups``), ``positions``
gives each sample's place on the timestep axis (``t / num_train_timesteps``): the model is told
it (``select_step``) before it runs those samples, as a sampler does, one call per distinct
position in a batch (so a batch may mix timesteps, and the first batch, which the SmoothQuant
and AWQ searches score on, spans them as the samples are given).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError


@dataclass(frozen=True, eq=False)  # tensors: no value equality, hashed by identity
class ModelInputs:
    """``args`` and ``kwargs`` of the model's forward, every tensor with the same number of
    samples along dim 0 (a timestep per sample: shape (N,), not a scalar); ``positions`` (N,)
    in [0, 1], optional: each sample's place on the timestep axis."""

    args: tuple[Tensor, ...] = ()
    kwargs: Mapping[str, Tensor] = field(default_factory=dict)
    positions: Tensor | None = None

    def __post_init__(self) -> None:
        named = self.named()
        if not named:
            raise LowbitError("model inputs: give at least one tensor (args or kwargs)")
        for name, t in named:
            if not isinstance(t, Tensor) or t.dim() == 0:
                what = type(t).__name__ if not isinstance(t, Tensor) else "a 0-d tensor"
                raise LowbitError(f"model input {name}: expected a tensor with the samples along "
                                  f"dim 0, got {what}")  # fmt: skip
        sizes = {name: t.shape[0] for name, t in named}
        if len(set(sizes.values())) != 1:
            raise LowbitError(f"model inputs hold different numbers of samples along dim 0: "
                              f"{sizes}")  # fmt: skip
        p = self.positions
        if p is not None and (not isinstance(p, Tensor) or p.shape != (len(self),)
                              or not p.is_floating_point()):  # fmt: skip
            raise LowbitError(f"model inputs: positions must be a float tensor of shape "
                              f"({len(self)},), one per sample")  # fmt: skip
        if p is not None and not bool(((p >= 0) & (p <= 1)).all()):
            raise LowbitError("model inputs: positions must lie in [0, 1] (t / timesteps)")

    def named(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) pairs: ``args[i]`` for positional inputs, the keyword otherwise."""
        return [(f"args[{i}]", t) for i, t in enumerate(self.args)] + list(self.kwargs.items())

    def __len__(self) -> int:
        return self.named()[0][1].shape[0]

    def __getitem__(self, index: slice) -> ModelInputs:
        if not isinstance(index, slice):
            raise TypeError("ModelInputs is sliced by ranges of samples (inputs[a:b])")
        return self._take(index)

    def _take(self, index: slice | Tensor) -> ModelInputs:
        return ModelInputs(tuple(t[index] for t in self.args),
                           {k: t[index] for k, t in self.kwargs.items()},
                           None if self.positions is None else self.positions[index])  # fmt: skip

    def split(self, size: int) -> tuple[ModelInputs, ...]:
        """Consecutive batches of ``size`` samples (the last may be smaller), as Tensor.split."""
        return tuple(self[i : i + size] for i in range(0, len(self), size))

    def by_position(self) -> list[tuple[float | None, Tensor, ModelInputs]]:
        """(position, sample indices, those samples) for each distinct position, ascending;
        one entry (position None) without ``positions``."""
        if self.positions is None:
            return [(None, torch.arange(len(self)), self)]
        out = []
        for p in torch.unique(self.positions).tolist():
            index = (self.positions == p).nonzero().flatten()
            out.append((p, index, self._take(index)))
        return out

    def call(self, model: Any, **extra: Any) -> Any:
        return model(*self.args, **self.kwargs, **extra)

    def sha256(self) -> str:
        """Digest of every tensor's name, dtype, shape and bytes, in order."""
        h = hashlib.sha256()
        named = self.named()
        if self.positions is not None:
            named.append(("positions", self.positions))
        for name, t in named:
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def shapes(self) -> dict[str, list[int]]:
        """Each input's shape per sample (dim 0 dropped)."""
        return {name: list(t.shape[1:]) for name, t in self.named()}


__all__ = ["ModelInputs"]

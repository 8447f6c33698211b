"""A checkpoint streamed through a rotation (:class:`lowbit.models.rotate.Rotator`): what the
streaming runner reads in place of the checkpoint's own tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.models.rotate import Rotator
from lowbit.models.source import TensorSource


class RotatedSource(TensorSource):
    """A checkpoint read through a rotation: the tensors it changes are computed on reading
    (float32), the others read as stored; a tied head appears as its own tensor."""

    def __init__(self, base: TensorSource, rotator: Rotator) -> None:
        self.base, self.rotator = base, rotator
        self.folder, self.weight_map = base.folder, base.weight_map
        self.entries = dict(base.entries)
        for name, source in rotator.aliases.items():
            self.entries[name] = base.entries[source]

    def load(self, name: str, dtype: torch.dtype | None = torch.float32) -> Tensor:
        if name not in self.rotator.ops:
            return self.base.load(name, dtype)
        t = self.rotator.tensor(name, self._as_linear)
        if name in self.rotator.stored_t:  # back to the checkpoint's (in, out)
            t = t.T.contiguous()
        return t if dtype is None else t.to(dtype)

    def _as_linear(self, name: str) -> Tensor:
        """A tensor as the rotation reads it: (out, in) weights, whatever the checkpoint."""
        t = self.base.load(name)
        return t.T if name in self.rotator.stored_t else t

    def item(self, name: str) -> Tensor | object:
        return self.load(name).contiguous() if name in self.rotator.ops else self.base.item(name)

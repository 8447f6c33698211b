"""Kernel layers that read one input, run as one kernel call (q/k/v; gate/up).

Why: at decode every kernel call has a fixed cost (Python dispatch, waking the other threads,
the weight stream ramping up) that is a large part of a small layer's time. Stacking the rows
of layers that share their input into one weight turns a llama block's seven calls into four;
the outputs are exactly those of the separate layers (each output row is computed alone).

:func:`share_input` stacks the layers' kernel weights once, at load time, and leaves each layer
holding row views of the stack (RAM holds the weight once). The first layer called on an input
computes every layer's output; the others take their rows. The cache is keyed on the input
tensor itself, so it is only correct when nothing writes into that tensor between the calls,
which holds for the model families that name these groups (``models.families``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.affine import AffineWeight, affine_linear


class SharedInput:
    """The stacked weight of ``members`` layers and the output for the latest input."""

    def __init__(self, aw: AffineWeight, members: int) -> None:
        self.aw, self.members = aw, members
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._served = 0

    def output(self, x: Tensor) -> Tensor:
        """All members' outputs for ``x`` (..., K) -> (..., sum of out_features)."""
        if x is not self._x:
            self._x, self._y, self._served = x, affine_linear(x, self.aw), 0
        y = self._y
        self._served += 1
        if self._served == self.members:  # every member has its rows: hold nothing
            self._x = self._y = None
        return y


def _layout(m) -> tuple:
    """What layers must have in common to run as one kernel call."""
    return m.in_features, m.group, m.bits, m.w.shape[1], m.scale.dtype, m.offset.numel() > 0


def share_input(layers: list) -> bool:
    """Run ``layers`` (``AffineKernelLinear`` modules that read the same input) as one call;
    False, changing nothing, unless they are at least two, none shared yet, with the same
    input width, group, bits and parameter layout."""
    if len(layers) < 2:
        return False
    if any(_layout(m) != _layout(layers[0]) or m.shared is not None for m in layers):
        return False
    w = torch.cat([m.w for m in layers])  # (sum N, Kp·bits/8)
    scale = torch.cat([m.scale for m in layers])
    offset = torch.cat([m.offset for m in layers])
    first = layers[0]
    aw = AffineWeight(w, scale, offset, first.group, first.bits, first.in_features)
    shared = SharedInput(aw, len(layers))
    row = 0
    for m in layers:
        n = m.w.shape[0]
        m.w, m.scale = w[row : row + n], scale[row : row + n]
        m.offset = offset[row : row + n] if offset.numel() else offset
        m.shared, m.rows = shared, (row, row + n)
        row += n
    return True

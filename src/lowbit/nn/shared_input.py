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


def share_input(layers: list) -> bool:
    """Run ``layers`` (``AffineKernelLinear`` modules that read the same input) as one call;
    False, changing nothing, unless they are at least two, none shared yet, with the same
    input width, group and bits."""
    if len(layers) < 2:
        return False
    key = (layers[0].in_features, layers[0].group, layers[0].bits, layers[0].w.shape[1])
    for m in layers:
        if (m.in_features, m.group, m.bits, m.w.shape[1]) != key or m.shared is not None:
            return False
    w = torch.cat([m.w for m in layers])  # (sum N, Kp·bits/8)
    scale = torch.cat([m.scale for m in layers])
    offset = torch.cat([m.offset for m in layers])
    shared = SharedInput(AffineWeight(w, scale, offset, key[1], key[2], key[0]), len(layers))
    row = 0
    for m in layers:
        n = m.w.shape[0]
        m.w, m.scale, m.offset = w[row : row + n], scale[row : row + n], offset[row : row + n]
        m.shared, m.rows = shared, (row, row + n)
        row += n
    return True

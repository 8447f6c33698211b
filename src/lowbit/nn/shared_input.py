"""Kernel layers that read one input, run as one kernel call (q/k/v; gate/up).

Why: at decode every kernel call has a fixed cost (Python dispatch, waking the other threads,
the weight stream ramping up) that is a large part of a small layer's time. Stacking the rows
of layers that share their input into one weight turns a llama block's seven calls into four;
the outputs are exactly those of the separate layers (each output row is computed alone).
Weight-only 4/8-bit layers (``AffineKernelLinear``) and W8A8 layers (``Int8KernelLinear``,
whose per-token input rounding then runs once for the group) are stacked alike.

:func:`share_input` stacks the layers' kernel weights once, at load time, and leaves each layer
holding row views of the stack (RAM holds the weight once). The first layer called on an input
computes every layer's output; the others take their rows. The cache is keyed on the input
tensor itself, so it is only correct when nothing writes into that tensor between the calls,
which holds for the model families that name these groups (``models.families``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lowbit.kernels.affine import BLOCK, AffineWeight, affine_linear
from lowbit.kernels.int8 import PANEL, Int8Weight, int8_linear


class SharedInput:
    """The stacked weight of ``members`` layers (an :class:`AffineWeight` of 4/8-bit codes, or
    an :class:`Int8Weight` of W8A8 layers) and the output for the latest input."""

    def __init__(self, weight: AffineWeight | Int8Weight, members: int) -> None:
        self.weight, self.members = weight, members
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._served = 0

    def __call__(self, x: Tensor) -> Tensor:
        """Every member's output for ``x``, computed now (no cache)."""
        if isinstance(self.weight, Int8Weight):
            return int8_linear(x, self.weight)
        return affine_linear(x, self.weight)

    def output(self, x: Tensor) -> Tensor:
        """All members' outputs for ``x`` (..., K) -> (..., sum of out_features), computed once
        for the members' calls on the same tensor."""
        if x is not self._x:
            self._x, self._y, self._served = x, self(x), 0
        y = self._y
        self._served += 1
        if self._served == self.members:  # every member has its rows: hold nothing
            self._x = self._y = None
        return y


def _layout(m) -> tuple:
    """What layers must have in common to run as one kernel call."""
    if hasattr(m, "weight_int8"):  # W8A8: codes (oneDNN's, the reference's) or panels
        return type(m), m.in_features, m.weight_int8.mm, m.weight_int8.codes is None
    return type(m), m.in_features, m.group, m.bits, m.w.shape[1], m.scale.dtype, (
        m.offset.numel() > 0)  # fmt: skip


def share_input(layers: list) -> bool:
    """Run ``layers`` (``AffineKernelLinear`` or ``Int8KernelLinear`` modules that read the
    same input) as one call; False, changing nothing, unless they are at least two of one
    kind, none shared yet, with the same input width and parameter layout (and whole blocks
    of rows each but the last: for W8A8 panels, panels of 8; for 4-bit codes, the kernels'
    interleaved blocks of 16)."""
    if len(layers) < 2:
        return False
    first = _layout(layers[0])
    if any(_layout(m) != first or m.shared is not None for m in layers):
        return False
    if not hasattr(layers[0], "weight_int8"):
        if layers[0].bits == 4 and any(m.out_features % BLOCK for m in layers[:-1]):
            return False  # a block of 16 rows would hold rows of two layers
        _share_affine(layers)
    elif layers[0].weight_int8.panels is not None and any(m.out_features % PANEL for m in layers):
        return False  # a panel of 8 rows would hold rows of two layers
    else:
        _share_int8(layers)
    return True


def _share_affine(layers: list) -> None:
    """:func:`share_input` for 4/8-bit weight-only layers: codes, scales and offsets stacked."""
    w = torch.cat([m.w for m in layers])  # (sum N, Kp·bits/8)
    scale = torch.cat([m.scale for m in layers])
    offset = torch.cat([m.offset for m in layers])
    head = layers[0]
    aw = AffineWeight(w, scale, offset, head.group, head.bits, head.in_features)
    shared = SharedInput(aw, len(layers))
    row = 0
    for m in layers:
        n = m.w.shape[0]
        m.w, m.scale = w[row : row + n], scale[row : row + n]
        m._held = None  # (its kernel weight was the unstacked copy)
        m.offset = offset[row : row + n] if offset.numel() else offset
        m.shared, m.rows = shared, (row, row + n)
        row += n


def _share_int8(layers: list) -> None:
    """:func:`share_input` for W8A8 layers: their codes (or panels) and scales stacked by rows,
    each layer left holding its rows' views (the inputs are rounded once per token for all)."""
    weights = [m.weight_int8 for m in layers]
    codes = None if weights[0].codes is None else torch.cat([w.codes for w in weights])
    panels = None if weights[0].panels is None else torch.cat([w.panels for w in weights])
    scale = torch.cat([w.scale for w in weights])
    stacked = replace(weights[0], codes=codes, scale=scale, panels=panels)
    shared = SharedInput(stacked, len(layers))
    row = 0
    for m in layers:
        n = m.out_features
        rows, panel_rows = slice(row, row + n), slice(row // PANEL, (row + n) // PANEL)
        m.weight_int8 = replace(
            stacked,
            codes=None if codes is None else codes[rows],
            scale=scale[rows],
            panels=None if panels is None else panels[panel_rows],
        )
        m.shared, m.rows = shared, (row, row + n)
        row += n

"""Blocked views: a 2-D tensor seen as a grid of (rows, cols) blocks, one scale per block."""

from __future__ import annotations

from torch import Tensor


def to_blocks(x: Tensor, block: tuple) -> Tensor:
    """(R, C) -> (R/br, C/bc, br*bc): each block's values along the last dim."""
    rows, cols = x.shape
    br, bc = block
    xb = x.reshape(rows // br, br, cols // bc, bc)  # (nR, br, nC, bc)
    return xb.permute(0, 2, 1, 3).reshape(rows // br, cols // bc, br * bc)


def from_blocks(xb: Tensor, block: tuple) -> Tensor:
    """Inverse of :func:`to_blocks`: (nR, nC, br*bc) -> (nR*br, nC*bc)."""
    n_rows, n_cols, _ = xb.shape
    br, bc = block
    x = xb.reshape(n_rows, n_cols, br, bc).permute(0, 2, 1, 3)  # (nR, br, nC, bc)
    return x.reshape(n_rows * br, n_cols * bc)

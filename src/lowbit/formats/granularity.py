"""Granularity as a block shape: every scale covers one (rows, cols) block of a 2-D tensor."""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec


def weight_block(spec: WeightSpec, out_features: int, in_features: int, layer: str = "") -> tuple:
    """The (rows, cols) block one scale covers in a weight of shape (out, in).

    A group size that does not divide ``in_features`` is an error naming the layer and the sizes
    that would work (no silent padding: the stored grid must be what the recipe said).
    """
    if spec.granularity == "tensor":
        return (out_features, in_features)
    if spec.granularity == "channel":
        return (1, in_features)
    group = spec.group_size
    if in_features % group:
        fits = [d for d in (16, 32, 48, 64, 96, 128, 192, 256) if in_features % d == 0]
        where = f" of layer {layer}" if layer else ""
        sizes = f"use one of {fits} or -1 (per-channel)" if fits else "use -1 (per-channel)"
        raise LowbitError(f"group_size {group} does not divide in_features {in_features}{where}; "
                          f"{sizes}, or exclude the layer")  # fmt: skip
    return (1, group)


def n_blocks(block: tuple, rows: int, cols: int) -> tuple:
    """Shape of the scale tensor: (rows // block_rows, cols // block_cols)."""
    return (rows // block[0], cols // block[1])

"""Upscaling an image of any size a window at a time, so that memory stays bounded (a 12 MP
photograph through waifu2x would otherwise hold activations of several GB) and a file with one
fixed input size (a ``.tflite``) takes any image at least that large.

Each tile of the input is upscaled from a window around it that holds ``halo`` more pixels on
every side the image has them (the model's reach: waifu2x pads its input by as much), and only
the tile's part of the output is kept. A model whose outputs depend on input pixels within
``halo`` only (upconv7) gives the whole-image result this way; one that pools over its whole
input (upresnet10's squeeze-excitation) sees its window's statistics, as waifu2x's own tiled
runs do. The tiles share each side evenly, so no thin last tile is run in a full window; a
fixed-size window (a ``.tflite``'s) keeps its size, the last one shifted inward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from lowbit.errors import LowbitError


def upscale_tiled(model: Callable[[Tensor], Tensor], x: Tensor, window: int | tuple[int, int],
                  halo: int, scale: int = 2, fixed: bool = False) -> Tensor:  # fmt: skip
    """``model``'s ``scale``-times upscale of ``x`` (N, C, H, W), run on windows of ``window``
    input pixels (height, width; smaller where the image is, unless ``fixed``: then the image
    must be at least that large)."""
    wh, ww = (window, window) if isinstance(window, int) else window
    if min(wh, ww) <= 2 * halo:
        raise LowbitError(f"a tile window of {min(wh, ww)} pixels leaves nothing inside its "
                          f"{halo}-pixel margins: give more than {2 * halo}")  # fmt: skip
    h, w = x.shape[-2:]
    if fixed and (h < wh or w < ww):
        raise LowbitError(f"the model takes {ww}x{wh} inputs; the image is {w}x{h}")
    out = None
    for y0, y1, a, ah in _spans(h, wh, halo, fixed):
        for x0, x1, b, bw in _spans(w, ww, halo, fixed):
            part = model(x[..., a : a + ah, b : b + bw])
            if out is None:
                out = part.new_empty(*part.shape[:2], h * scale, w * scale)
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale] = part[
                ..., (y0 - a) * scale : (y1 - a) * scale, (x0 - b) * scale : (x1 - b) * scale
            ]
    return out


DEFAULT_TILE = 256  # input pixels a side: ~0.7 GB peak for waifu2x on any image size


def upscaler(model: Callable[[Tensor], Tensor], halo: int,
             tile: int = DEFAULT_TILE) -> Callable[[Tensor], Tensor]:  # fmt: skip
    """``model`` as a function that upscales a window of ``tile`` input pixels a side at a time
    (``tile`` 0: ``model`` itself, the whole image at once); a ``.tflite``'s model (one input
    size, its ``input_shape``) always runs on windows of that size."""
    fixed = getattr(model, "input_shape", None)
    if fixed is not None:
        return lambda x: upscale_tiled(model, x, tuple(fixed[-2:]), halo, fixed=True)
    if tile < 0 or 0 < tile <= 2 * halo:
        raise LowbitError(f"--tile {tile}: give more than {2 * halo} pixels (the model's "
                          f"margins), or 0 for whole images")  # fmt: skip
    if tile == 0:
        return model
    return lambda x: upscale_tiled(model, x, tile, halo)


def _spans(size: int, window: int, halo: int, fixed: bool) -> list[tuple[int, int, int, int]]:
    """(start, end, window start, window size) of each tile along one side. Free windows share
    the side evenly (as few as ``window`` allows: no thin last tile run at full size); a fixed
    window keeps its size, the last one shifted inward."""
    if window >= size:  # one window (a fixed one is then exactly the image's size)
        return [(0, size, 0, size)]
    count = math.ceil(size / (window - 2 * halo))
    tile = window - 2 * halo if fixed else math.ceil(size / count)
    window = window if fixed else min(tile + 2 * halo, size)
    return [(start, min(start + tile, size), min(max(start - halo, 0), size - window), window)
            for start in range(0, size, tile)]  # fmt: skip


__all__ = ["DEFAULT_TILE", "upscale_tiled", "upscaler"]

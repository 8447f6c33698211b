"""Running an image model on what a user hands it, shared by ``lowbit generate`` and
``lowbit serve``: outputs mapped to [0, 1], a super-resolution model's upscale of one image
(grey in, grey out) and PNG bytes of an output."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def to_unit(out: Tensor, output_range: tuple[float, float]) -> Tensor:
    """A model's outputs mapped from ``output_range`` to [0, 1] (float32, clamped)."""
    lo, hi = output_range
    return ((out.float() - lo) / (hi - lo)).clamp(0, 1)


def is_grey(x: Tensor) -> bool:
    """Whether an RGB input (1, 3, H, W) is grey (read from a grey file)."""
    return x.shape[1] == 3 and bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())


@torch.inference_mode()
def upscale_image(upscale: Callable[[Tensor], Tensor], x: Tensor,
                  output_range: tuple[float, float]) -> Tensor:  # fmt: skip
    """One image (1, C, H, W) through ``upscale`` (e.g. :func:`~.tiles.upscaler`'s windows):
    (C, 2H, 2W) in [0, 1], or one channel for a grey input (its three channels averaged)."""
    image = to_unit(upscale(x), output_range)[0]
    return image.mean(0, keepdim=True) if is_grey(x) else image


def png_bytes(image: Tensor, bits: int = 8) -> bytes:
    """One (C, H, W) image in [0, 1] as PNG: 8-bit, or 16-bit for a grey image with ``bits``
    16 (PIL writes no 16-bit colour PNG)."""
    from PIL import Image

    wide = bits == 16 and image.shape[0] == 1
    top, dtype = (65535, np.uint16) if wide else (255, np.uint8)
    array = image.detach().float().clamp(0, 1).mul(top).round().permute(1, 2, 0).numpy()
    array = array.astype(dtype)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()

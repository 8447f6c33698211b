"""Inputs for image models: scikit-image's bundled sample images, the 2x super-resolution
protocol, crops for calibration, seeded latents. Calibration and evaluation never share an
image or a latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError

EVAL_IMAGE = "astronaut"  # super-resolution is scored on this one only
CALIB_IMAGES = ("coffee", "chelsea", "rocket")


def sample_image(name: str) -> Tensor:
    """One of scikit-image's bundled RGB sample images as (1, 3, H, W) in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise LowbitError("image samples need scikit-image: pip install 'lowbit[image]'") from None
    array = getattr(data, name)()
    if array.ndim != 3 or array.shape[2] != 3:
        raise LowbitError(f"scikit-image sample {name!r} is not an RGB image")
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255).unsqueeze(0)


def super_resolution_pair(image: Tensor) -> tuple[Tensor, Tensor]:
    """(input, ground truth) for 2x super-resolution from an (N, 3, H, W) image: the image
    cropped to even sides, and its bicubic, antialiased half-size version."""
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    truth = image[..., :h, :w]
    small = F.interpolate(truth, size=(h // 2, w // 2), mode="bicubic", antialias=True)
    return small.clamp(0, 1), truth


def bicubic_2x(image: Tensor) -> Tensor:
    """The baseline a super-resolution model must beat."""
    size = (image.shape[-2] * 2, image.shape[-1] * 2)
    return F.interpolate(image, size=size, mode="bicubic").clamp(0, 1)


def sr_evaluation() -> tuple[Tensor, Tensor]:
    """(input, ground truth): the evaluation image, downscaled 2x."""
    return super_resolution_pair(sample_image(EVAL_IMAGE))


def sr_calibration(count: int = 16, size: int = 64, seed: int = 0) -> Tensor:
    """``count`` seeded ``size`` x ``size`` crops of the other sample images, downscaled 2x as
    the inputs are."""
    g = torch.Generator().manual_seed(seed)
    crops = []
    for name in CALIB_IMAGES:
        small, _ = super_resolution_pair(sample_image(name))
        for _ in range(count // len(CALIB_IMAGES) + 1):
            y = int(torch.randint(0, small.shape[-2] - size, (1,), generator=g))
            x = int(torch.randint(0, small.shape[-1] - size, (1,), generator=g))
            crops.append(small[0, :, y : y + size, x : x + size])
    return torch.stack(crops[:count])


def latents(count: int, width: int, seed: int) -> Tensor:
    """``count`` seeded standard-normal latents (N, width, 1, 1)."""
    return torch.randn(count, width, 1, 1, generator=torch.Generator().manual_seed(seed))

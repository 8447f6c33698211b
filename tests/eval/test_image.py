"""Image metrics (torchmetrics) and the super-resolution protocol."""

import math

import pytest
import torch

pytest.importorskip("torchmetrics", reason="image metrics need the image extra")

from lowbit.errors import LowbitError
from lowbit.eval.image import psnr, ssim
from lowbit.models.images.data import bicubic_2x, super_resolution_pair


def test_psnr_and_ssim_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g)
    b = (a + 0.01 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    mse = float((a - b).pow(2).mean())
    assert psnr(b, a) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6) and 0.5 < ssim(b, a) < 1
    each = [psnr(b[:, :, i : i + 8], a[:, :, i : i + 8]) for i in (0, 8, 16, 24)]
    pair = torch.cat([b[:, :, i : i + 8] for i in (0, 8, 16, 24)])
    truth = torch.cat([a[:, :, i : i + 8] for i in (0, 8, 16, 24)])
    assert psnr(pair, truth, per_image=True) == pytest.approx(sum(each) / 4, rel=1e-5)
    with pytest.raises(LowbitError, match="share one"):
        psnr(a, a[..., :16])


def test_super_resolution_pair_halves_and_bicubic_doubles():
    image = torch.rand(1, 3, 33, 40)
    small, truth = super_resolution_pair(image)
    assert small.shape == (1, 3, 16, 20) and truth.shape == (1, 3, 32, 40)
    assert bicubic_2x(small).shape == truth.shape

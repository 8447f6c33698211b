"""Upscaling a window at a time: the whole-image result for a model whose reach is its halo."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.images.tiles import upscale_tiled
from lowbit.models.images.waifu2x import UpConv7


@pytest.fixture(scope="module")
def sr():
    torch.manual_seed(0)
    return UpConv7().eval()


def _recording(sr):
    """``sr`` as a function that records the size of each window it is given."""
    calls = []

    def model(part):
        calls.append(tuple(part.shape[-2:]))
        return sr(part)

    return model, calls


@pytest.mark.parametrize("window", [20, 29, (30, 50), 200])
def test_windows_give_the_whole_images_upscale(sr, window):
    x = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(1))
    model, calls = _recording(sr)
    with torch.inference_mode():
        whole, tiled = sr(x), upscale_tiled(model, x, window, UpConv7.pad)
    assert tiled.shape == whole.shape == (2, 3, 90, 122)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    wh, ww = (window, window) if isinstance(window, int) else window
    assert all(h <= min(wh, 45) and w <= min(ww, 61) for h, w in calls)  # never larger
    assert len(set(calls)) == 1  # the side shared evenly: no thin last tile run at full size
    assert len(calls) > 1 or window == 200


def test_a_fixed_window_shifts_inward_and_needs_a_large_enough_image(sr):
    x = torch.rand(1, 3, 33, 50, generator=torch.Generator().manual_seed(2))
    model, calls = _recording(sr)
    with torch.inference_mode():
        tiled = upscale_tiled(model, x, 30, UpConv7.pad, fixed=True)
        torch.testing.assert_close(tiled, sr(x), rtol=0, atol=1e-5)
        assert set(calls) == {(30, 30)}  # the one size the file takes
        calls.clear()
        upscale_tiled(model, x[..., :30, :30], 30, UpConv7.pad, fixed=True)
        assert calls == [(30, 30)]  # an image of exactly that size: one call
        with pytest.raises(LowbitError, match="takes 40x40 inputs; the image is 50x33"):
            upscale_tiled(sr, x, 40, UpConv7.pad, fixed=True)
    with pytest.raises(LowbitError, match="give more than 14"):
        upscale_tiled(sr, x, 14, UpConv7.pad)

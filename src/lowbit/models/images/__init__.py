"""Generative image models: architectures ported to torch and their pinned offline weights.

:func:`image_models` names them for ``load_model`` (zoo names ``waifu2x-upconv7``,
``waifu2x-upresnet10``, ``dcgan-faces``, ``cdcgan-eyes`` and ``ddpm-digits``) and for loading
a quantized folder of one (its skeleton is built from the name its manifest records, with
BatchNorm folded as quantization left it). Their classes set ``quantized_whole``: a
repeated stack of residual blocks is not a decoder's, and the block runner (which feeds token
ids) must not take it for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from lowbit.models.images.cdcgan import LATENT as EYES_LATENT
from lowbit.models.images.cdcgan import CDCGANGenerator, cdcgan_eyes, cycling_classes
from lowbit.models.images.data import (
    latents,
    sr_calibration,
    sr_crops,
    sr_evaluation,
    sr_scoring_pair,
)
from lowbit.models.images.dcgan import LATENT, DCGANGenerator, dcgan_faces
from lowbit.models.images.ddpm import DigitsDDPM, ddpm_digits, noise
from lowbit.models.images.waifu2x import (
    UpConv7,
    UpResNet10,
    waifu2x_upconv7,
    waifu2x_upresnet10,
)


@dataclass(frozen=True)
class ImageModel:
    """An image model lowbit knows by name: how to build and load it, what it is calibrated
    and evaluated on (inputs; ground truth where there is one) and its output range."""

    name: str
    description: str
    build: Callable[[], nn.Module]  # the architecture, random weights
    load: Callable[[], nn.Module]  # the pinned pretrained weights
    calibration: Callable[[], Tensor]
    evaluation: Callable[[], tuple[Tensor, Tensor | None]]
    output_range: tuple[float, float] = (0.0, 1.0)
    # user images -> calibration inputs (None: the model takes no images, e.g. a generator)
    from_images: Callable[[list[Tensor]], Tensor] | None = None
    channels: int = 3  # of the images it takes
    # a user image and the largest side scored -> (input, ground truth); None: no such protocol
    scoring_pair: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None = None
    # a generator's inputs: (count, seed) -> seeded latents or noise; None: it takes images
    sample: Callable[[int, int], Tensor] | None = None
    halo: int = 0  # a super-resolution model's reach: input pixels a tile needs around it


def _sr_from_images(images: list[Tensor]) -> Tensor:
    return sr_crops(images, count=max(16, len(images)))


def _gan_inputs(count: int, seed: int) -> Tensor:
    return latents(count, LATENT, seed=seed)


def _gan_calibration() -> Tensor:
    return _gan_inputs(512, seed=1)  # GPTQ's first layer has 1,600 inputs: 16 rows each


def _gan_evaluation() -> tuple[Tensor, None]:
    return _gan_inputs(256, seed=0), None


def _eyes_inputs(count: int, seed: int) -> Tensor:
    return cycling_classes(latents(count, EYES_LATENT, seed=seed))  # every colour in turn


def _eyes_calibration() -> Tensor:
    return _eyes_inputs(512, seed=1)  # (512, 101, 1, 1): 64 per colour


def _eyes_evaluation() -> tuple[Tensor, None]:
    return _eyes_inputs(256, seed=0), None


def _ddpm_calibration() -> Tensor:
    return noise(64, seed=1)  # 25 steps each: every layer sees 1,600 inputs per range slice


def _ddpm_evaluation() -> tuple[Tensor, None]:
    return noise(256, seed=0), None


def image_models() -> dict[str, ImageModel]:
    entries = (
        ImageModel("waifu2x-upconv7", "waifu2x upconv7 2x super-resolution (995k params); "
                   "calibrated on crops of 3 sample images, scored on a 4th (astronaut)",
                   UpConv7, waifu2x_upconv7, sr_calibration, sr_evaluation,
                   from_images=_sr_from_images, scoring_pair=sr_scoring_pair,
                   halo=UpConv7.pad),
        ImageModel("waifu2x-upresnet10", "waifu2x upresnet10 2x super-resolution (422k "
                   "params: residual blocks with squeeze-excitation); same inputs",
                   UpResNet10, waifu2x_upresnet10, sr_calibration, sr_evaluation,
                   from_images=_sr_from_images, scoring_pair=sr_scoring_pair,
                   halo=UpResNet10.pad),
        ImageModel("dcgan-faces", "DCGAN face generator, 100-d latent to 64x64 RGB (3.58M "
                   "params); calibrated on 512 latents, scored on 256 others", DCGANGenerator,
                   dcgan_faces, _gan_calibration, _gan_evaluation, (-1.0, 1.0),
                   sample=_gan_inputs),
        ImageModel("cdcgan-eyes", "class-conditional DCGAN eye generator, 100-d latent + one "
                   "of 8 eye colours to 128x128 RGB (12.9M params); calibrated on 512 latents, "
                   "scored on 256 others (colours cycling)", CDCGANGenerator, cdcgan_eyes,
                   _eyes_calibration, _eyes_evaluation, (-1.0, 1.0), sample=_eyes_inputs),
        ImageModel("ddpm-digits", "DDPM (diffusers UNet2DModel, 1.1M params) trained here once "
                   "on scikit-learn's digits at 16x16; noise to digits in 25 DDIM steps; "
                   "calibrated on 64 noise images, scored on 256 others", DigitsDDPM,
                   ddpm_digits, _ddpm_calibration, _ddpm_evaluation, (-1.0, 1.0), channels=1,
                   sample=noise),
    )  # fmt: skip
    return {e.name: e for e in entries}


__all__ = [
    "CDCGANGenerator",
    "DCGANGenerator",
    "DigitsDDPM",
    "ImageModel",
    "UpConv7",
    "UpResNet10",
    "cdcgan_eyes",
    "dcgan_faces",
    "ddpm_digits",
    "image_models",
    "waifu2x_upconv7",
    "waifu2x_upresnet10",
]  # fmt: skip

"""Inputs for image models: scikit-image's bundled sample images, the 2x super-resolution
protocol, crops for calibration, seeded latents. Calibration and evaluation never share an
image or a latent."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
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


def sr_scoring_pair(image: Tensor, side: int = 512) -> tuple[Tensor, Tensor]:
    """(input, ground truth) of a user's image for scoring: its centre, at most ``side`` x
    ``side`` pixels (0: the whole image), as :func:`super_resolution_pair` makes them."""
    h, w = image.shape[-2:]
    if side > 0:
        top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
        image = image[..., top : top + side, left : left + side]
    return super_resolution_pair(image.contiguous())


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
    return sr_crops([sample_image(name) for name in CALIB_IMAGES], count, size, seed)


def sr_crops(images: list[Tensor], count: int = 16, size: int = 64, seed: int = 0) -> Tensor:
    """``count`` seeded ``size`` x ``size`` crops of ``images`` ((1, C, H, W) each, taken in
    turn), downscaled 2x as a super-resolution model's inputs are."""
    g = torch.Generator().manual_seed(seed)
    smalls = [super_resolution_pair(image)[0] for image in images]
    crops = []
    for i in range(count):
        small = smalls[i % len(smalls)]
        y = int(torch.randint(0, small.shape[-2] - size + 1, (1,), generator=g))
        x = int(torch.randint(0, small.shape[-1] - size + 1, (1,), generator=g))
        crops.append(small[0, :, y : y + size, x : x + size])
    return torch.stack(crops)


def image_calibration_of(entry: Any, images_path: str | None) -> Any:
    """The calibration set of the image model ``entry`` (an ``ImageModel``): crops of the
    images at ``images_path`` where given, else the model's own calibration inputs."""
    from lowbit.calibration import image_calibration

    images = user_images(entry, images_path)
    if images is not None:
        return image_calibration(entry.from_images(images), f"crops of {images_path}")
    return image_calibration(entry.calibration(), f"{entry.name} calibration inputs")


def user_images(entry: Any, path: str | None) -> list[Tensor] | None:
    """The calibration images at ``path`` for ``entry``, checked, or None without a path."""
    if path is None:
        return None
    if entry.from_images is None:
        raise LowbitError(f"--calib-images: {entry.name} takes no images (it is calibrated on "
                          f"its own inputs)")  # fmt: skip
    return read_images(path, entry.channels, min_side=128)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
UPLOADS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")  # what a server decodes (Pillow's names)


def read_images(path: str, channels: int, min_side: int) -> list[Tensor]:
    """The images in ``path`` (one file, or a folder's image files in name order) as
    (1, C, H, W) in [0, 1], each checked: ``channels`` channels, sides of ``min_side`` or more."""
    return [image.pixels for image in named_images(path, channels, min_side)]


class UserImage(NamedTuple):
    name: str  # the file's name
    pixels: Tensor  # (1, C, H, W) in [0, 1]
    bits: int  # 8, or 16 for a 16-bit grey file


def named_images(path: str, channels: int, min_side: int) -> list[UserImage]:
    """:func:`read_images` with each image's file name and bit depth (8-bit files of any mode
    PIL converts to RGB, and 16-bit grey ones, for an RGB model)."""
    return [_read_one(file, file.name, channels, min_side) for file in image_files(path)]


def image_files(path: str) -> list[Path]:
    """The files :func:`named_images` reads: ``path`` itself, or its folder's image files
    (by suffix) in name order."""
    root = Path(path).expanduser()
    if root.is_dir():  # hidden files (macOS's "._x.png"), folders and broken links skipped
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file() and not p.name.startswith("."))  # fmt: skip
        if not files:
            raise LowbitError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if root.is_file():
        return [root]
    raise LowbitError(f"{path}: no such image file or folder")


def disjoint_images(calib: str | None, evaluation: str | None) -> None:
    """A one-line error when calibration and evaluation images share a file."""
    if calib is None or evaluation is None:
        return
    shared = {p.resolve() for p in image_files(calib)} & {p.resolve() for p in
                                                          image_files(evaluation)}  # fmt: skip
    if shared:
        raise LowbitError(f"calibration and evaluation images must differ: {min(shared).name} "
                          f"is in both")  # fmt: skip


def image_from_bytes(data: bytes, channels: int, max_pixels: int) -> UserImage:
    """An image file's bytes (a client's upload) read as :func:`named_images` reads a file;
    one of more than ``max_pixels`` pixels is refused before it is decoded."""
    import io

    return _read_one(io.BytesIO(data), "the image", channels, 1, max_pixels)


def _read_one(file: Any, label: str, channels: int, min_side: int,
              max_pixels: int | None = None) -> UserImage:  # fmt: skip
    """One image (a path, or a binary file object from a client: only :data:`UPLOADS`
    formats; ``label`` names it in errors)."""
    import warnings

    from PIL import Image, ImageOps

    local = isinstance(file, Path)
    where = file if local else label
    try:
        with warnings.catch_warnings():  # the size is checked here, below Pillow's own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file, formats=None if local else UPLOADS) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise LowbitError(f"{where}: {image.width}x{image.height} pixels; at most "
                                      f"{max_pixels} are taken here")  # fmt: skip
                if getattr(image, "n_frames", 1) > 1:
                    log.info("%s: the first of its %d frames is read", label, image.n_frames)
                upright = ImageOps.exif_transpose(image)  # as a viewer shows it (EXIF)
                kind, mode = image.format, upright.mode
                array = np.asarray(_as_rgb(upright, label) if channels == 3 else upright)
    except LowbitError:
        raise
    except Image.DecompressionBombError as exc:  # past Pillow's own limit, before any check
        size = str(exc).split(",")[0]
        limit = f"; at most {max_pixels} are taken here" if max_pixels is not None else ""
        raise LowbitError(f"{where}: too many pixels ({size}){limit}") from None
    except Exception as exc:  # crafted files reach many of Pillow's decoders' errors
        why = exc if local else ", ".join(UPLOADS)
        raise LowbitError(f"{where}: not a readable image ({why})") from None
    bits = _bits(array, mode, kind, where)
    if bits == 16 and channels == 3:
        log.info("%s: 16-bit grey image read as RGB", label)
        array = np.repeat(array[..., None], 3, axis=2)
    have = 1 if array.ndim == 2 else array.shape[2]
    if have != channels:
        raise LowbitError(f"{where}: {have} channel(s) ({mode}); the model takes "
                          f"{channels}-channel images")  # fmt: skip
    if min(array.shape[:2]) < min_side:
        raise LowbitError(f"{where}: {array.shape[1]}x{array.shape[0]} pixels; sides of at "
                          f"least {min_side} are needed")  # fmt: skip
    pixels = torch.from_numpy(array.astype(np.float32)).reshape(*array.shape[:2], channels)
    pixels = pixels.permute(2, 0, 1).div(2**bits - 1).unsqueeze(0)
    return UserImage(label, pixels, bits)


def _bits(array: np.ndarray, mode: str, kind: str | None, file: Path | str) -> int:
    """8, or 16 for a 16-bit grey file (PIL's "I;16" modes, or a PNG's "I": PNG stores at most
    16 bits; a TIFF's "I" holds 32-bit integers, refused as float pixels are)."""
    if array.dtype == np.uint8:
        return 8
    wide = array.dtype.kind == "u" and array.dtype.itemsize == 2  # "I;16", "I;16B", ...
    png = mode == "I" and kind == "PNG" and array.min() >= 0 and array.max() < 2**16
    if not (array.ndim == 2 and (wide or png)):
        raise LowbitError(f"{file}: {array.dtype} pixels ({mode}); 8-bit images or 16-bit grey "
                          f"ones only")  # fmt: skip
    return 16


# 8-bit modes an RGB model reads after PIL's conversion (grey and black-and-white replicated, a
# palette looked up, alpha and CMYK converted); 16-bit and float modes keep their one-line error
TO_RGB = ("1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr")
WIDE = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # read as they are, or refused by _bits


def _as_rgb(image: Any, label: str) -> Any:
    if image.mode == "RGB" or image.mode in WIDE:
        return image
    if image.mode not in TO_RGB:  # LAB, HSV, ...: colours Pillow cannot give as RGB
        raise LowbitError(f"{label}: {image.mode} pixels; RGB, grey, palette or CMYK images "
                          f"(8-bit), or 16-bit grey ones only")  # fmt: skip
    dropped = " (its alpha channel dropped)" if image.mode.endswith("A") else ""
    name = "1-bit" if image.mode == "1" else image.mode
    log.info("%s: %s image read as RGB%s", label, name, dropped)
    return image.convert("RGB")


def latents(count: int, width: int, seed: int) -> Tensor:
    """``count`` seeded standard-normal latents (N, width, 1, 1): the first rows of the same
    draw for every count (``--count 5`` gives the first 5 of ``--count 16``'s samples)."""
    # torch's CPU normal sampler makes its values 16 at a time and draws a tail that is not a
    # multiple of 16 differently, so whole blocks of 16 rows are drawn and the rest dropped
    rows = -(-count // 16) * 16
    draw = torch.randn(rows, width, 1, 1, generator=torch.Generator().manual_seed(seed))
    return draw[:count].clone()

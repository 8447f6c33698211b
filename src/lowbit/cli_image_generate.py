"""``lowbit generate`` on an image model, float or quantized (a zoo name, a lowbit folder or
its ``.tflite``): a generator's samples from seeded latents or noise, or a super-resolution
model's upscale of the user's images, written as PNG files."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.cli_args import given, positive
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

RECORD = "lowbit_images.json"  # what made a folder of images (lowbit.assets.atomic.RECORDS)


def add_image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "image models",
        "a generator draws --count samples from seed --seed; a super-resolution model upscales "
        "--image; the PNGs go to --out",
    )  # fmt: skip
    g.add_argument("--out", type=Path, metavar="PATH",
                   help="a .png file (one upscaled image, or a generator's samples as one grid) "
                   "or a folder (a PNG per image)")  # fmt: skip
    g.add_argument(
        "--image",
        metavar="PATH",
        help="super-resolution models: an image, or a folder of images, to upscale 2x",
    )
    g.add_argument("--count", type=positive, default=None,
                   help="generators: how many samples (default 16)")  # fmt: skip
    g.add_argument("--tile", type=int, default=None, metavar="N",
                   help="super-resolution models: upscale windows of at most N x N input "
                   "pixels, each with the model's margin, so memory stays bounded on large images "
                   "(default 256; 0: the whole image at once; a .tflite uses its own input "
                   "size)")  # fmt: skip
    g.add_argument("--overwrite", action="store_true",
                   help="replace --out if lowbit wrote it (a folder only if it holds "
                   f"{RECORD})")  # fmt: skip


def refuse_image_options(args: argparse.Namespace, model: str) -> None:
    """A one-line error when a language model is given an image model's options."""
    options = (("--out", args.out), ("--image", args.image), ("--count", args.count),
               ("--tile", args.tile))  # fmt: skip
    given = [flag for flag, value in options if value is not None]
    if given:
        raise LowbitError(f"{given[0]} is for image models; {model} generates text (streamed "
                          f"to stdout)")  # fmt: skip


def generate_images(args: argparse.Namespace, entry: Any) -> int:
    from lowbit import api
    from lowbit.assets.atomic import prepare_out
    from lowbit.cli_image import refuse_text_options
    from lowbit.eval.image import outputs
    from lowbit.models.images.run import upscale_image
    from lowbit.models.images.tiles import DEFAULT_TILE, upscaler

    if args.prompt is not None or args.chat:
        raise LowbitError(f"{entry.name} is an image model: it takes no prompt ("
                          f"{_what(entry)})")  # fmt: skip
    refuse_text_options(args, entry, ("max_new_tokens", "temperature", "top_p", "top_k",
                                      "system"), _what(entry))  # fmt: skip
    if args.out is None:
        raise LowbitError(f"give --out: a .png file or a folder for the images ({_what(entry)})")
    grid = args.out.suffix.lower() == ".png"
    names, inputs, bits = _inputs(args, entry, grid)
    prepare_out(args.out, args.overwrite, folder=not grid)
    model = api.load_model(args.model).model
    start = time.perf_counter()
    if isinstance(inputs, Tensor):  # a generator's batch
        images = list(outputs(model, inputs, entry.output_range))
    else:  # the user's images, of any sizes: one at a time, a window at a time
        upscale = upscaler(model, entry.halo, DEFAULT_TILE if args.tile is None else args.tile)
        images = []
        for name, x in zip(names, inputs, strict=True):
            try:
                images.append(upscale_image(upscale, x, entry.output_range))
            except LowbitError as exc:  # e.g. an image smaller than a .tflite's input
                raise LowbitError(f"{name}: {exc}") from None
    seconds = time.perf_counter() - start
    if grid and len(images) == 1:
        _write_png(args.out, images[0], bits[0])
    elif grid:
        _write_png(args.out, _tile(images))
    else:
        _write_folder(args, names, images, bits)
    summary = {"out": str(args.out), "images": len(images),
               "size": list(images[0].shape[-2:]), "seconds": round(seconds, 3),
               "images_per_s": round(len(images) / seconds, 2)}  # fmt: skip
    if args.json:
        print(json_text(summary))
    else:
        h, w = summary["size"]
        what = "a grid of " if grid and len(images) > 1 else ""
        print(f"wrote {what}{len(images)} image(s) of {w}x{h} to {args.out} "
              f"({summary['images_per_s']:.2f} images/s)")  # fmt: skip
    return 0


def _what(entry: Any) -> str:
    if entry.sample is None:
        return "it upscales --image 2x"
    return "it draws --count samples from seed --seed"


def _inputs(args: argparse.Namespace, entry: Any, grid: bool) -> tuple[list[str], Any, list]:
    """The output file names, the inputs (a batch of a generator's seeded latents or noise,
    or the user's images: a list, their sizes differ) and each output's bit depth (16 for a
    16-bit grey file's upscale)."""
    from lowbit.models.images.data import named_images

    if entry.sample is not None:
        for flag, value in (("--image", args.image), ("--tile", args.tile)):
            if value is not None:
                raise LowbitError(f"{flag}: {entry.name} takes no images ({_what(entry)})")
        count = args.count or 16
        names = [f"sample_{i:04d}.png" for i in range(count)]
        return names, entry.sample(count, args.seed), [8] * count
    if args.image is None:
        raise LowbitError(f"give --image: the image (or folder of images) {entry.name} upscales")
    wrong = given(args, "count", "seed")
    if wrong:
        raise LowbitError(f"{wrong[0]} is for generators; {entry.name} upscales --image")
    images = named_images(args.image, entry.channels, min_side=1)
    if grid and len(images) > 1:
        raise LowbitError(f"--out {args.out} is one file and {args.image} holds {len(images)} "
                          f"images: give a folder")  # fmt: skip
    names = [f"{Path(image.name).stem}.png" for image in images]
    if len(set(names)) < len(names):
        raise LowbitError(f"{args.image}: two images share a name before their suffix; their "
                          f"PNGs would collide")  # fmt: skip
    return names, [image.pixels for image in images], [image.bits for image in images]


def _tile(images: list[Tensor]) -> Tensor:
    """Images (C, H, W) of one size side by side, as square a grid as fits them."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    c, h, w = images[0].shape
    grid = torch.zeros(c, rows * h, cols * w)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return grid


def _write_png(path: Path, image: Tensor, bits: int = 8) -> None:
    """One (C, H, W) image in [0, 1] as a PNG file, written atomically."""
    from lowbit.assets.atomic import atomic_file
    from lowbit.models.images.run import png_bytes

    with atomic_file(path) as tmp:
        tmp.write_bytes(png_bytes(image, bits))


def _write_folder(args: argparse.Namespace, names: list[str], images: list[Tensor],
                  bits: list[int]) -> None:  # fmt: skip
    from lowbit.assets.atomic import PRODUCER, atomic_dir

    with atomic_dir(args.out, args.overwrite) as tmp:
        for name, image, depth in zip(names, images, bits, strict=True):
            _write_png(tmp / name, image, depth)
        record = PRODUCER | {"model": args.model, "images": names}
        record |= {"input": args.image} if args.image else {"seed": args.seed}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

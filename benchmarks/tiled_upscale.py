"""Upscaling a large image with `lowbit generate`, whole or a window at a time: peak memory,
time, and whether the pixels change.

Protocol: each row is one fresh process, ``lowbit generate MODEL --image IMAGE --out PNG
--tile N --json`` (N = 0: the whole image at once), run one after another, alone; its peak
resident memory is the process's own (``os.wait4``), its wall time includes loading the model,
and the next column is the upscale alone, as `generate` times it. The last column compares
the row's PNG with the first row's (by default the whole image at once), pixel by pixel.
Default image: scikit-image's ``retina`` (1,411 x 1,411 RGB, upscaled to 2,822 x 2,822).

    .venv/bin/python benchmarks/tiled_upscale.py [MODEL] [--tiles 0 512 256 128] [--threads 2]

MODEL: a zoo super-resolution model, a lowbit folder of one, or its .tflite (default
waifu2x-upconv7, float32). Needs the image extra (scikit-image, Pillow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowbit.eval import format_table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="waifu2x-upconv7")
    p.add_argument("--image", help="the image to upscale (default: scikit-image's retina)")
    p.add_argument("--tiles", type=int, nargs="+", default=[0, 512, 256, 128],
                   help="--tile values, one process each (0: whole; the first is compared "
                   "with)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    args = p.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = args.image or _retina(Path(tmp) / "retina.png")
        rows, first = [], None
        for i, tile in enumerate(args.tiles):
            out = Path(tmp) / f"row{i}-tile{tile}.png"
            result, seconds, peak = _run(args, image, tile, out)
            with Image.open(out) as png:
                pixels = np.asarray(png).astype(np.int16)
            first = pixels if first is None else first
            diff = int(np.abs(pixels - first).max())
            h, w = result["size"]
            rows.append([tile or "whole", f"{w}x{h}", round(peak / 2**20), round(seconds, 1),
                         round(result["seconds"], 2), diff])  # fmt: skip
            print(format_table(HEADER, rows[-1:]), flush=True)
    print()
    print(format_table(HEADER, rows, markdown=True))
    return 0


HEADER = ["--tile", "output", "peak RSS MB", "wall s (process)", "s (the upscale)",
          "max |pixel - first row's|"]  # fmt: skip


def _retina(path: Path) -> str:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.retina()).save(path)
    return str(path)


def _run(args: argparse.Namespace, image: str, tile: int, out: Path) -> tuple[dict, float, int]:
    """(generate's JSON, wall seconds, peak RSS bytes) of one process."""
    cmd = [sys.executable, "-m", "lowbit", "-q", "generate", args.model, "--image", image,
           "--out", str(out), "--tile", str(tile), "--json"]  # fmt: skip
    if args.threads:
        cmd[3:3] = ["--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1]), seconds, usage.ru_maxrss * 1024


if __name__ == "__main__":
    sys.exit(main())

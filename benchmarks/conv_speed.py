"""W8A8 convolutions on the integer kernel against float32, side by side: images per second of
each image model as `lowbit eval` runs it (float32; `conv-w8a8-static` on the kernels
`use_kernels` picks; the same quantized model on its reference path, codes dequantized at every
call; its weights alone, `w8-rtn`, on the weight-only kernel), float32 in both layouts (torch's
default NCHW, and channels-last, which oneDNN's float convolutions run faster on some shapes
and CPUs; "x float32" is against the faster of the two), timed in alternation (one call of each
variant per round, medians over the rounds), plus how far the kernel's output is from the
reference path's and from float32's.

Inputs: waifu2x on the 256 x 256 evaluation input (the astronaut image downscaled 2x), the GANs
on their evaluation latents at batch 1 and 16. Static ranges from each zoo entry's calibration
inputs. The integer convolution is oneDNN's on CPUs with VNNI (AVX-512 VNNI or AVX-VNNI) and
lowbit's AVX2 kernel elsewhere (``w8a8-conv-avx2`` in the path column); there a further row,
"w8a8 static, float convolution", times what such a CPU ran before that kernel: each layer's
input rounded to its range, then torch's float convolution (``w8a8-float-conv``, the weight-only
module's path). To time an AVX-VNNI CPU without AVX-512 on one that has both, run with
``LOWBIT_KERNEL_ISA=avxvnni ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2_VNNI
MKL_ENABLE_INSTRUCTIONS=AVX2``; an AVX2 CPU, with ``LOWBIT_KERNEL_ISA=avx2
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.

    .venv/bin/python benchmarks/conv_speed.py [--threads 2] [--rounds 7] [--only NAME ...]

With ``--layers``: weight-only 3x3 convolutions of a Stable-Diffusion-1.5 UNet's shapes (random
weights, batch 1), ms per call in alternation: float32, the W8 / W4 kernel module as loaded
(``w8a16-conv`` / ``w4a16-conv``, the path it picks in the last column) and each of its two
paths forced (the codes dequantized into torch's convolution; im2col rows through the affine
GEMM).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.eval import format_table
from lowbit.eval.image import psnr
from lowbit.models import use_kernels
from lowbit.models.images import image_models
from lowbit.models.modules import set_module
from lowbit.nn import QuantConv, QuantLinear
from lowbit.nn.kernel_conv import affine_conv_module

BATCHES = {"waifu2x-upconv7": (1,), "waifu2x-upresnet10": (1,), "dcgan-faces": (1, 16),
           "cdcgan-eyes": (1, 16)}  # fmt: skip
HEADER = ["model", "batch", "variant", "path", "images/s", "x float32", "PSNR vs reference dB",
          "PSNR vs float dB"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (7)")
    p.add_argument("--only", nargs="+", choices=sorted(BATCHES), help="these models only")
    p.add_argument(
        "--layers",
        action="store_true",
        help="weight-only convolution layers of UNet shapes instead of the models",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers:
        return _layers(args.rounds)
    rows = []
    for name in args.only or BATCHES:
        more = _model_rows(name, args.rounds)
        rows += more
        print(format_table(HEADER, more), flush=True)
    print(f"\nthreads {torch.get_num_threads()}, {args.rounds} alternating rounds, medians\n")
    print(format_table(HEADER, rows, markdown=True))
    return 0


def _model_rows(name: str, rounds: int) -> list[list]:
    entry = image_models()[name]
    float_model = entry.load()
    reference = copy.deepcopy(float_model)
    calib = image_calibration(entry.calibration(), f"{name} calibration inputs")
    api.quantize(reference, "conv-w8a8-static", calib, progress=False)
    kernel = copy.deepcopy(reference)
    counts = use_kernels(kernel)
    path = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    ref_name = "w8a8 static, reference path"
    weight_only = copy.deepcopy(float_model)
    api.quantize(weight_only, "w8-rtn", progress=False)
    wo_path = ", ".join(f"{k} {v}" for k, v in sorted(use_kernels(weight_only).items()))
    variants = {
        "float32": (float_model, "float"),
        "float32, channels-last": (_ChannelsLast(float_model), "float"),
        "w8a8 static": (kernel, path),
        ref_name: (reference, f"reference {sum(counts.values())}"),
        "w8 weight-only (w8-rtn)": (weight_only, wo_path),
    }
    if any(k.endswith("-avx2") for k in counts):
        rounding = copy.deepcopy(reference)
        kinds = _float_convolutions(rounding)
        variants["w8a8 static, float convolution"] = (rounding, kinds)
    inputs, _ = entry.evaluation()
    lo, hi = entry.output_range
    rows = []
    for batch in BATCHES[name]:
        x = inputs[:batch]
        with torch.inference_mode():
            out = {k: ((m(x).float() - lo) / (hi - lo)).clamp(0, 1)
                   for k, (m, _) in variants.items()}  # fmt: skip
            times = _alternating({k: m for k, (m, _) in variants.items()}, x, rounds)
        # the faster float32 layout is the baseline (torch's default NCHW, or channels-last,
        # which oneDNN's float convolutions prefer on some CPUs)
        base = batch / min(statistics.median(times[k]) for k in variants if k.startswith("float"))
        for k, (_, kind) in variants.items():
            speed = batch / statistics.median(times[k])
            integer = k in ("w8a8 static", "w8a8 static, float convolution")
            vs_ref = round(_psnr(out[k], out[ref_name]), 2) if integer else "-"
            vs_float = "-" if k.startswith("float32") else round(_psnr(out[k], out["float32"]), 2)
            rows.append([name, batch, k, kind, round(speed, 2), round(speed / base, 2), vs_ref,
                         vs_float])  # fmt: skip
    return rows


LAYERS = (
    (1280, 1280, 8),
    (1280, 1280, 16),
    (640, 640, 8),
    (640, 640, 16),
    (640, 640, 32),
    (320, 320, 16),
    (320, 320, 64),
)
LAYER_HEADER = ["conv 3x3", "bits", "float32 ms", "kernel ms", "x float32", "dequantize + conv ms",
                "im2col + GEMM ms", "kernel path"]  # fmt: skip


@torch.inference_mode()
def _layers(rounds: int) -> int:
    from torch import nn

    from lowbit.recipes import Recipe

    rows = []
    for cin, cout, size in LAYERS:
        torch.manual_seed(0)
        conv, x = nn.Conv2d(cin, cout, 3, padding=1).eval(), torch.randn(1, cin, size, size)
        for bits in (8, 4):
            model = nn.Sequential(copy.deepcopy(conv))
            model.quantized_whole = True
            body = {"version": 1, "name": "w", "algorithm": "rtn", "ignore": [],
                    "weights": {"bits": bits, "group_size": -1}}  # fmt: skip
            api.quantize(model, Recipe.from_dict(body), progress=False)
            use_kernels(model)
            kernel = model[0]
            forced = {"conv": _forced(kernel, False), "im2col": _forced(kernel, True)}
            times = _alternating({"float": conv, "kernel": kernel, **forced}, x, rounds)
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            path = "im2col + GEMM" if kernel.weight_bound(x) else "dequantize + conv"
            rows.append([f"{cin}->{cout} at {size}x{size}", bits, f"{ms['float']:.1f}",
                         f"{ms['kernel']:.1f}", f"{ms['float'] / ms['kernel']:.2f}",
                         f"{ms['conv']:.1f}", f"{ms['im2col']:.1f}", path])  # fmt: skip
            print(format_table(LAYER_HEADER, rows[-1:]), flush=True)
    print(f"\nthreads {torch.get_num_threads()}, {rounds} alternating rounds, medians\n")
    print(format_table(LAYER_HEADER, rows, markdown=True))
    return 0


class _ChannelsLast(torch.nn.Module):
    """A float model with its weights and input in channels-last layout (NHWC)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def _float_convolutions(model: torch.nn.Module) -> str:
    """Each W8A8 convolution on the weight-only module (input rounded, float convolution), as
    ``use_kernels`` ran them on CPUs without VNNI before lowbit's AVX2 integer convolution."""
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        fast = affine_conv_module(module) if isinstance(module, QuantConv) else None
        kind = "reference" if fast is None else fast.kind
        counts[kind] = counts.get(kind, 0) + 1
        if fast is not None:
            set_module(model, name, fast)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _forced(kernel, im2col: bool):
    """The kernel module with its path fixed."""
    forced = copy.copy(kernel)
    forced.weight_bound = lambda x: im2col
    return forced


def _alternating(models: dict, x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    for m in models.values():  # warm-up
        m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            start = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - start)
    return times


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr(a, b, per_image=True) if a.shape[0] > 1 else psnr(a, b)


if __name__ == "__main__":
    sys.exit(main())

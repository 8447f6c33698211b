"""A Stable-Diffusion-1.5-shaped UNet (diffusers' UNet2DConditionModel with SD-1.5's config,
random weights: no pretrained diffusion weights are reachable offline) quantized with lowbit:
weights held in RAM and time per denoising step, float32 against each variant.

Protocol: one seeded float32 UNet (859.5M parameters); each variant is a copy quantized whole
(every Conv2d and Linear; norms and biases stay float) with data-free RTN weights; bytes are
lowbit's ``model_size`` of the module in memory (codes, scales, zeros and every float tensor).
One denoising step = one UNet call at batch 1 on a 64 x 64 x 4 latent, timestep 500 and a
77 x 768 text embedding (all seeded noise). Timing alternates float and each variant, best of
``--rounds``. "out SQNR" compares the variant's output with the float one on that input: with
random weights it measures rounding, not image quality. Each quantized copy then runs as
`lowbit eval` runs a saved model (`use_kernels`, the counts printed): W8A8 convolutions on
oneDNN's integer convolution where the CPU has VNNI (AVX-512's or AVX-VNNI), on lowbit's AVX2
integer convolution elsewhere (``w8a8-conv-avx2``; ``LOWBIT_KERNEL_ISA=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` holds a VNNI CPU to that path), weight-only
linears on lowbit's kernels, weight-only convolutions dequantized in one native pass per call
into torch's float convolution (``w8a16-conv`` / ``w4a16-conv``; im2col + GEMM where few output
positions share the weight, see lowbit.nn.kernel_conv), every other layer on the reference
path; bytes are counted after that swap (the kernels' layouts, float32 scales).

    .venv/bin/python benchmarks/unet_memory.py [--threads 2] [--rounds 2]

Needs diffusers (the image extra).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lowbit import api
from lowbit.eval import format_table
from lowbit.eval.size import model_size
from lowbit.models import use_kernels
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe

SD15 = {  # runwayml/stable-diffusion-v1-5 unet/config.json, the fields that differ from defaults
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
ACTS = {"bits": 8, "granularity": "tensor", "dynamic": True, "symmetric": False}
VARIANTS = {
    "w8 per-channel": {"weights": {"bits": 8, "symmetric": True, "group_size": -1}},
    "w4 per-channel": {"weights": {"bits": 4, "group_size": -1}},
    "w8a8 (dynamic per-tensor acts)": {
        "weights": {"bits": 8, "symmetric": True, "group_size": -1},
        "activations": ACTS,
    },
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (2)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500]),
              torch.randn(1, 77, 768, generator=g))  # fmt: skip
    params = sum(p.numel() for p in unet.parameters())
    models = {"float32": unet}
    rows = {"float32": [_bytes(unet), None, None]}
    for name, body in VARIANTS.items():
        model = copy.deepcopy(unet)
        start = time.perf_counter()
        report = api.quantize(model, Recipe.from_dict({"version": 1, "name": name, **body}),
                              progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        counts = use_kernels(model)
        models[name] = model
        rows[name] = [_bytes(model), len(report.layers), seconds]
        print(f"{name}: {len(report.layers)} layers in {seconds:.0f} s; {counts}", flush=True)
    steps = _alternating(models, inputs, args.rounds)
    with torch.inference_mode():
        ref = unet(*inputs).sample
        sqnr = {n: sqnr_db(ref, m(*inputs).sample) for n, m in models.items() if n != "float32"}
    base = rows["float32"][0]
    header = ["variant", "layers quantized", "weights in RAM (MB)", "x float32", "s / step",
              "step x float32", "out SQNR dB"]  # fmt: skip
    table = []
    for name, (size, layers, _) in rows.items():
        table.append([name, layers or 0, f"{size / 1e6:.0f}", f"{size / base:.3f}",
                      f"{steps[name]:.2f}", f"{steps[name] / steps['float32']:.2f}",
                      "" if name == "float32" else f"{sqnr[name]:.1f}"])  # fmt: skip
    print(
        f"\nSD-1.5-shaped UNet, {params / 1e6:.1f}M parameters, random weights, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(format_table(header, table, markdown=True))
    return 0


def _bytes(model: torch.nn.Module) -> int:
    return model_size(model).total_bytes


@torch.inference_mode()
def _alternating(models: dict, inputs: tuple, rounds: int) -> dict[str, float]:
    """Best seconds per UNet call of each model, the models taking turns (warm-up first)."""
    for model in models.values():
        model(*inputs)
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(*inputs)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


if __name__ == "__main__":
    raise SystemExit(main())

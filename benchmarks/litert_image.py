"""Quantized waifu2x (upconv7, or upresnet10 with --model) exported to LiteRT and run in the
LiteRT interpreter (XNNPACK), in one run: quality against the astronaut's ground truth and
against lowbit's own outputs, file size, and time per image beside lowbit's float32 model and
the same folder in lowbit.

Protocol: each recipe quantizes the pinned model (GPTQ rows calibrate on the scikit-image crops,
never the evaluation image), the folder is saved and exported with `lowbit.export.export(...,
"litert")` (weight-only codes: DEQUANTIZE feeds each float convolution; W8A8 presets: full
integer, int8 tensors between the layers, lowbit's ranges and codes; upresnet10's residual
adds and squeeze-excitation gates on int8 too); the 256x256
astronaut input (downscaled 2x) is upscaled by lowbit's float32 model, by the folder in lowbit
(as `lowbit eval` loads it) and by the .tflite in ai-edge-litert's interpreter with
`--threads` threads. Timing: ROUNDS rounds, one call of each per round in turn, medians.

    .venv/bin/python benchmarks/litert_image.py [--model waifu2x-upconv7] [--threads 2]
        [--rounds 5] [--rows TEXT]

Needs the litert and image extras (`pip install 'lowbit[litert,image]'`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.calibration import image_calibration
from lowbit.eval import format_table
from lowbit.eval.image import psnr, ssim
from lowbit.export import export
from lowbit.models.images import image_models
from lowbit.models.images.data import sr_calibration, sr_evaluation
from lowbit.recipes import Recipe, load_recipe

CH = {"group_size": -1, "symmetric": True}
RECIPES = {
    "w8 per-channel (w8-rtn)": {"weights": {"bits": 8, **CH}},
    "w4 per-channel, gptq": {"algorithm": "gptq", "weights": {"bits": 4, **CH}},
    "w4 per-channel, zero points, gptq": {
        "algorithm": "gptq",
        "weights": {"bits": 4, "group_size": -1, "zero_point": "int"},
    },
    "w8a8 static (conv-w8a8-static)": "conv-w8a8-static",
    "w8a8 static, smoothquant, gptq (conv-w8a8-best)": "conv-w8a8-best",
}
HEADER = ["variant", "file MB", "PSNR vs truth (LiteRT)", "SSIM (LiteRT)",
          "max |LiteRT - lowbit|", "PSNR LiteRT vs lowbit", "ms/image LiteRT", "ms/image lowbit",
          "ms/image float32"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="waifu2x-upconv7",
                   choices=["waifu2x-upconv7", "waifu2x-upresnet10"])  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="threads for torch and LiteRT")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (medians)")
    p.add_argument("--rows", metavar="TEXT", help="only the variants whose name contains TEXT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    entry = image_models()[args.model]
    small, truth = sr_evaluation()
    calib = image_calibration(sr_calibration(), "skimage coffee/chelsea/rocket crops")
    float_model = entry.load()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, body in RECIPES.items():
            if args.rows and args.rows not in name:
                continue
            if isinstance(body, str):
                recipe = load_recipe(body)
            else:
                recipe = Recipe.from_dict({"version": 1, "name": "r", "ignore": [], **body})
            model = entry.load()
            report = api.quantize(model, recipe, calib if recipe.needs_calibration else None,
                                  progress=False)  # fmt: skip
            src = api.load_model(args.model)
            folder = api.save(model, Path(work) / name.replace(" ", "_"), report, source=src)
            result = export(folder, "litert", Path(work) / f"{folder.name}.tflite")
            rows.append(_row(name, result, api.load(folder).model, float_model, small, truth,
                             args))  # fmt: skip
            print(format_table(HEADER, rows[-1:]), flush=True)
    print(f"\n{args.model} in LiteRT (ai-edge-litert, XNNPACK, {args.threads} threads), "
          f"256x256 astronaut input, {args.rounds} alternating rounds\n")  # fmt: skip
    print(format_table(HEADER, rows, markdown=True))
    return 0


def _row(name, result, lowbit_model, float_model, small, truth, args) -> list:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(result.path), num_threads=args.threads)
    (key,) = interp.get_signature_list()["serving_default"]["inputs"]
    runner = interp.get_signature_runner()

    def litert() -> torch.Tensor:
        (y,) = runner(**{key: small.numpy()}).values()
        return torch.from_numpy(y)

    calls = {"litert": litert, "lowbit": lambda: lowbit_model(small),
             "float": lambda: float_model(small)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        outs = {k: f() for k, f in calls.items()}  # warm-up
        for _ in range(args.rounds):
            for k, f in calls.items():
                start = time.perf_counter()
                f()
                times[k].append(1000 * (time.perf_counter() - start))
    got = outs["litert"].clamp(0, 1)
    diff = float((outs["litert"] - outs["lowbit"]).abs().max())
    ms = {k: round(statistics.median(v), 1) for k, v in times.items()}
    quality = [
        round(psnr(got, truth), 2),
        round(ssim(got, truth), 4),
        f"{diff:.1e}",
        round(psnr(got, outs["lowbit"].clamp(0, 1)), 2),
    ]
    return [name, round(result.bytes / 1e6, 2), *quality, ms["litert"], ms["lowbit"], ms["float"]]


if __name__ == "__main__":
    sys.exit(main())

"""What keeping the calibration hidden states in bfloat16 between blocks costs in accuracy.

GPTQ W4 g64 on the default model, calibrated on `bbc` (128 windows of 512 tokens, seed 0) with
the hidden states carried from block to block in float32, then in bfloat16 (`--hidden-dtype`);
both scored against the float model on `wiki` (16,384 tokens, windows of 2,048), same windows.

    python benchmarks/hidden_dtype.py [--recipe w4-gptq-g64] [--samples 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lowbit import api
from lowbit.eval.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w4-gptq-g64")
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    src = api.load_model("smollm2-135m")
    calib = api.calibration_set(src.tokenizer, "bbc", args.samples, 512, 0)
    models, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            out, report = api.quantize_to("smollm2-135m", args.recipe, Path(tmp) / dtype, calib,
                                          hidden_dtype=dtype)  # fmt: skip
            seconds[dtype] = (time.perf_counter() - start, report.peak_rss_mb)
            models[dtype] = api.load(out, kernels=False).model
        results = api.evaluate({"float": src.model, **models}, src.tokenizer, "wiki", 2048, 16384,
                               ref=src.model)  # fmt: skip
    rows = [[name, r.ppl, r.kl, r.top1, *(seconds.get(name, ("", ""))) ]
            for name, r in results.items()]  # fmt: skip
    print(f"smollm2-135m, {args.recipe}, calibration bbc {args.samples} x 512; "
          f"wiki 16,384 tokens, windows of 2,048")  # fmt: skip
    print(format_table(["hidden states", "ppl", "KL vs fp", "top-1 vs fp", "quantize s",
                        "peak RSS MB"], rows))  # fmt: skip


if __name__ == "__main__":
    main()

"""Beyond uniform grids on the default model: LoRC, K-means codebooks, NF4, FP8 and QAT beside
the RTN/GPTQ baselines.

Each row is quantized in this process (wall time is its own), scored against the float model on
the same `wiki` windows, and printed as soon as it is measured: bits/weight with every overhead
(scales, zeros, LoRC factors), perplexity, ratio to float, KL(fp || q), top-1 agreement.

    .venv/bin/python benchmarks/beyond_uniform.py [--rows rtn-w3g64 rtn-w3g64-lorc8 ...]
        [--tokens 16384] [--calib-samples 128]

GPTQ and K-means rows calibrate on `bbc` (128 windows x 512 tokens, seed 0; K-means weighs each
input by its mean squared activation); evaluation text is `wiki`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

from lowbit import api
from lowbit.eval import model_size
from lowbit.pipeline.qat import QATOptions, pack_model, train_fake_quant
from lowbit.recipes import Recipe

W3G64 = {"bits": 3, "group_size": 64}
ROWS = {
    "rtn-w3g64": ("rtn", W3G64),
    "rtn-w3g64-lorc8": ("rtn", {**W3G64, "lorc_rank": 8}),
    "gptq-w3g64": ("gptq", W3G64),
    "gptq-w3g64-lorc8": ("gptq", {**W3G64, "lorc_rank": 8}),
    "rtn-w3-channel": ("rtn", {"bits": 3, "group_size": -1}),
    "kmeans-w3-channel": ("kmeans", {"bits": 3, "group_size": -1}),
    "rtn-int4-asym-g64": ("rtn", {"bits": 4, "group_size": 64}),
    "rtn-nf4-g64": ("rtn", {"format": "nf4", "group_size": 64}),
    "rtn-fp8-e4m3-channel": ("rtn", {"format": "fp8_e4m3", "bits": 8, "group_size": -1}),
    "qat-w3g64": ("qat", W3G64),  # prints the fake-quant and the packed model
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calib", default="bbc")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--qat-train", default="shakespeare")
    p.add_argument("--qat-steps", type=int, default=100)
    p.add_argument("--qat-lr", type=float, default=5e-5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = api.load_model(args.model, kernels=False)
    fp = api.evaluate({"float": src.model}, src.tokenizer, args.corpus, args.seqlen,
                      args.tokens, progress=False)["float"]  # fmt: skip
    print(
        f"model {args.model}; evaluation {fp.corpus} (sha256 {fp.corpus_sha256[:12]}): "
        f"{fp.windows} windows x {fp.seqlen} = {fp.tokens} tokens; float ppl {fp.ppl:.3f}; "
        f"GPTQ calibration {args.calib}: {args.calib_samples} x {args.calib_seqlen} tokens\n"
    )
    print("| row | algorithm | weights | bits/w | ppl | x fp | KL | top-1 | quantize s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    calibration = None
    for name in args.rows:
        algorithm, weights = ROWS[name]
        calibrated = algorithm in ("gptq", "kmeans")
        if calibrated and calibration is None:
            calibration = api.calibration_set(src.tokenizer, args.calib, args.calib_samples,
                                              args.calib_seqlen)  # fmt: skip
        body = {"version": 1, "name": name, "weights": weights, "ignore": ["lm_head"]}
        recipe = Recipe.from_dict({**body, "algorithm": "rtn" if algorithm == "qat" else algorithm})
        model = copy.deepcopy(src.model)
        t0 = time.perf_counter()
        if algorithm == "qat":  # train, score the fake-quant model, pack, score again
            train = api.calibration_set(src.tokenizer, args.qat_train, 2 * args.qat_steps, 128)
            options = QATOptions(args.qat_steps, args.qat_lr, 2, "kl")
            fakes, _ = train_fake_quant(model, recipe, train, options, progress=False)
            row(
                f"{name} (fake-quant)",
                "qat",
                model,
                recipe,
                time.perf_counter() - t0,
                src,
                fp,
                args,
            )
            pack_model(model, fakes, recipe)
            name = f"{name} (packed)"
        else:
            api.quantize(model, recipe, calibration if calibrated else None, progress=False)
        row(name, algorithm, model, recipe, time.perf_counter() - t0, src, fp, args)
        del model


def row(name, algorithm, model, recipe, seconds, src, fp, args) -> None:
    """Score ``model`` against the float model and print its table row."""
    bpw = model_size(model).bits_per_weight  # NaN for the fake-quant model: same as packed
    r = api.evaluate({name: model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                     ref=src.model, progress=False)[name]  # fmt: skip
    bits = "–" if bpw != bpw else f"{bpw:.3f}"
    print(
        f"| {name} | {algorithm} | {recipe.weights.short()} | {bits} | {r.ppl:.3f} | "
        f"{r.ppl / fp.ppl:.3f} | {r.kl:.4f} | {r.top1:.3f} | {seconds:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()

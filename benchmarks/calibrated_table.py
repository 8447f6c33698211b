"""Calibrated weight quantization on the default model: every algorithm at every format, one run.

Each (algorithm, format) is quantized by a separate `lowbit quantize` process (so its wall time
and peak RSS are its own), calibrated on `bbc`, then scored against the float model on the same
`wiki` windows; each row of the Markdown table is printed as soon as it is measured:
perplexity, ratio to float, KL(fp || q) per token, top-1 agreement, quantization wall time and
peak RSS.

    .venv/bin/python benchmarks/calibrated_table.py [--formats w4-g64 w3-g32 w4-channel]
        [--algorithms rtn hqq gptq awq awq+gptq autoround awq+autoround]
        [--autoround-iters 200] [--autoround-batch 8] [--calib-samples 128] [--calib-seqlen 512]

W4 group 32 is deliberately absent: the default model's weights already lie on that grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lowbit import api
from protocol import add_protocol_options, float_figures

FORMATS = {
    "w4-g64": {"bits": 4, "group_size": 64},
    "w3-g32": {"bits": 3, "group_size": 32},
    "w4-channel": {"bits": 4, "group_size": -1},
}


def quantize(model: str, algorithm: str, fmt: str, out: Path, args: argparse.Namespace) -> dict:
    recipe = {"version": 1, "name": f"{algorithm}-{fmt}", "algorithm": algorithm,
              "weights": FORMATS[fmt], "ignore": ["lm_head"]}  # fmt: skip
    if algorithm.endswith("autoround"):
        recipe["autoround"] = {"iters": args.autoround_iters, "batch_size": args.autoround_batch}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", model, "--recipe", str(path),
           "--out", str(out), "--calib", args.calib, "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--json"]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--algorithms", nargs="+", default=["rtn", "hqq", "gptq", "awq", "awq+gptq"])
    p.add_argument(
        "--autoround-iters",
        type=int,
        default=200,
        help="AutoRound steps per block (the paper's 200 by default)",
    )
    p.add_argument(
        "--autoround-batch",
        type=int,
        default=8,
        help="calibration windows per AutoRound step (the paper's 8 by default)",
    )
    add_protocol_options(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = api.load_model(args.model, kernels=False)
    fp = float_figures(args, src)
    print("| format | algorithm | bits/w | ppl | x fp | KL | top-1 | quantize s | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    # each row is printed as soon as it is measured: a stopped run keeps what it printed
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            for algorithm in args.algorithms:
                name = f"{algorithm}-{fmt}"
                print(f"quantizing {name} ...", file=sys.stderr, flush=True)
                run = quantize(args.model, algorithm, fmt, Path(tmp) / name, args)
                model = api.load(run["out"], kernels=False).model
                r = api.evaluate({name: model}, src.tokenizer, args.corpus, args.seqlen,
                                 args.tokens, ref=src.model, progress=False)[name]  # fmt: skip
                bpw, rss = run["size"]["bits_per_weight"], round(run["peak_rss_mb"])
                print(
                    f"| {fmt} | {algorithm} | {bpw:.3f} | {r.ppl:.3f} | {r.ppl / fp.ppl:.3f} | "
                    f"{r.kl:.4f} | {r.top1:.3f} | {run['seconds']:.1f} | {rss} |",
                    flush=True,
                )
                del model


if __name__ == "__main__":
    main()

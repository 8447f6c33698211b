"""Weights and activations on the default model: W8A8 (dynamic and static), SmoothQuant, W4A8
ZeroQuant with and without LKD, in one run.

Every row is quantized in this process from a fresh copy of the float model, calibrated on
`bbc` (the same windows for every row), and scored against the float model on the same `wiki`
windows; each row of the Markdown table is printed as soon as it is measured: perplexity, ratio
to float, KL(fp || q) per token, top-1 agreement and the quantization wall time (SmoothQuant's
search, GPTQ, LKD training and static range calibration included).

    .venv/bin/python benchmarks/activation_table.py [--rows NAME ...] [--lkd-steps 100]

Rows: `w8a8` (int8 per-channel weights, 8-bit per-token dynamic inputs), `+sq` SmoothQuant with
its α searched per group, `static-<observer>` (one calibrated 8-bit range per layer),
`w4a8` (ZeroQuant: int4 g64 weights, 8-bit per-token inputs) `+lkd`, `gptq`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

from lowbit import api
from lowbit.recipes import Recipe
from protocol import add_protocol_options, start

W8 = {"bits": 8, "symmetric": True, "group_size": -1}
W4 = {"bits": 4, "group_size": 64}
TOKEN8 = {"bits": 8, "granularity": "token", "dynamic": True}
OBSERVERS = ("minmax", "percentile", "mse", "entropy", "meanstd")


def _static(observer: str) -> dict:
    return {"bits": 8, "granularity": "tensor", "dynamic": False, "observer": observer}


def rows(lkd_steps: int) -> dict[str, dict]:
    """name -> recipe mapping (lm_head stays in float in every row)."""
    lkd = {"steps": lkd_steps}
    table = {
        "w8a8": ("rtn", W8, TOKEN8, {}),
        "w8a8+sq": ("rtn", W8, TOKEN8, {"smoothquant": {}}),
    }
    for obs in OBSERVERS:
        table[f"w8a8-static-{obs}"] = ("rtn", W8, _static(obs), {})
    for obs in ("minmax", "percentile"):
        table[f"w8a8-static-{obs}+sq"] = ("rtn", W8, _static(obs), {"smoothquant": {}})
    table |= {
        "w4a8": ("rtn", W4, TOKEN8, {}),
        "w4a8+lkd": ("rtn", W4, TOKEN8, {"lkd": lkd}),
        "w4a8+gptq": ("gptq", W4, TOKEN8, {}),
        "w4a8+gptq+lkd": ("gptq", W4, TOKEN8, {"lkd": lkd}),
        "w8a8+sq+gptq": ("gptq", W8, TOKEN8, {"smoothquant": {}}),
    }
    return {name: {"version": 1, "name": name, "algorithm": algo, "weights": w,
                   "activations": a, "ignore": ["lm_head"], **extra}
            for name, (algo, w, a, extra) in table.items()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    p.add_argument("--lkd-steps", type=int, default=100)
    add_protocol_options(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = rows(args.lkd_steps)
    src, calib, fp = start(args, table)
    print("| row | weights | activations | extra | ppl | x fp | KL | top-1 | quantize s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.rows or table:  # printed as measured: a stopped run keeps its rows
        recipe = Recipe.from_dict(table[name])
        print(f"quantizing {name} ...", file=sys.stderr, flush=True)
        model = copy.deepcopy(src.model)
        report = api.quantize(model, recipe, calib, progress=False)
        r = api.evaluate({name: model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                         ref=src.model, progress=False)[name]  # fmt: skip
        extra = "+".join(k for k in ("smoothquant", "lkd") if getattr(recipe, k) is not None)
        print(f"| {name} | {recipe.algorithm} {recipe.weights.short()} | "
              f"{recipe.activations.short()} | {extra or '-'} | {r.ppl:.3f} | "
              f"{r.ppl / fp.ppl:.4f} | {r.kl:.4f} | {r.top1:.3f} | {report.seconds:.1f} |",
              flush=True)  # fmt: skip
        del model


if __name__ == "__main__":
    main()

"""Mixed precision from measured sensitivity on the default model, against uniform formats.

One sensitivity analysis on `bbc` calibration windows (each layer alone in each candidate
format, KL against the float model, and the Hessian proxy with its rank correlation), then for
each budget the knapsack's per-layer choice is quantized (RTN) and scored on `wiki`, beside every
uniform format; bits/weight are measured on the packed model (scales included). Rows print as
they are measured.

    .venv/bin/python benchmarks/mixed_table.py [--budgets 3.5 4.25] [--analysis-samples 4]
        [--plot docs/sensitivity-smollm2.png]

W4 with groups of 32 is never a candidate: the default model's weights already lie on that grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

from lowbit import api
from lowbit.analysis.allocate import candidate_specs
from lowbit.analysis.plot import plot_sensitivity
from lowbit.analysis.sensitivity import Sensitivity, layer_bits
from lowbit.calibration import CalibrationSet
from lowbit.recipes import Recipe

CANDIDATES = ["2g64", "3g64", "3g32", "4g192", "4g64"]
UNIFORM_ONLY = ["2g32", "3g192", "3ch", "4ch"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", nargs="+", type=float, default=[3.5, 4.25])
    p.add_argument("--candidates", nargs="+", default=CANDIDATES)
    p.add_argument("--analysis-samples", type=int, default=2)
    p.add_argument("--calib", default="bbc")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--plot", type=Path)
    p.add_argument("--save", type=Path, help="write the sensitivity measurements (JSON) here")
    p.add_argument("--load", type=Path, help="reuse measurements saved by --save (or analyze)")
    p.add_argument("--mixed-only", action="store_true", help="skip the uniform rows")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = api.load_model(args.model, kernels=False)
    weights = {"bits": 4, "group_size": 64}
    base = Recipe.from_dict({"version": 1, "name": "rtn-g64", "algorithm": "rtn",
                             "weights": weights, "ignore": ["lm_head"]})  # fmt: skip
    calib = api.calibration_set(src.tokenizer, args.calib, args.analysis_samples,
                                args.calib_seqlen)  # fmt: skip
    fp = api.evaluate({"float": src.model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                      progress=False)["float"]  # fmt: skip
    start = time.perf_counter()
    if args.load:
        sens = Sensitivity.from_dict(json.loads(args.load.read_text()))
    else:
        sens = api.analyze(src.model, base, calib, args.candidates, progress=True)
    seconds = time.perf_counter() - start
    print(f"model {args.model}; sensitivity on {sens.tokens} {args.calib} tokens "
          f"({len(sens.layers)} layers x {len(sens.candidates)} formats, {seconds:.0f} s); "
          f"evaluation {fp.corpus}: {fp.windows} windows x {fp.seqlen} = {fp.tokens} tokens; "
          f"float ppl {fp.ppl:.3f}\n", flush=True)  # fmt: skip
    rhos = {c: sens.rank_correlation(c) for c in sens.candidates}
    print(
        "proxy (Hessian-weighted error) vs measured KL, Spearman: all pairs "
        f"{sens.rank_correlation():.3f}; " + ", ".join(f"{c} {r:.3f}" for c, r in rhos.items())
    )
    if args.plot:
        plot_sensitivity(sens, args.plot, title=args.model)
    if args.save:
        args.save.write_text(json.dumps(sens.to_dict()))
    print("\n| model | bits/w (measured) | ppl | x fp | KL | top-1 | layers per format |")
    print("|---|---:|---:|---:|---:|---:|---|", flush=True)
    for budget in args.budgets:
        recipe, summary = api.mixed_recipe(src.model, base, sens, target_bits=budget)
        counts = ", ".join(f"{c} {k}" for c, k in summary["layers_per_candidate"].items() if k)
        row(src, fp, f"mixed, budget {budget}", recipe, None, counts, args)
    if args.mixed_only:
        return
    uniform = candidate_specs(base.weights, [*args.candidates, *UNIFORM_ONLY])
    for name, spec in uniform.items():  # every uniform format at or under the largest budget
        if layer_bits_per_weight(spec) > max(args.budgets):
            continue
        data = base.to_dict() | {"weights": spec.to_dict(), "name": name}
        row(src, fp, f"uniform {spec.short()}", Recipe.from_dict(data), None, "all", args)


def layer_bits_per_weight(spec) -> float:
    """Bits/weight of the format on a 576-wide layer (codes and scales), as packed."""
    import torch

    return layer_bits(torch.nn.Linear(1536, 576), spec, "probe") / (1536 * 576)


def row(src, fp, label, recipe, calib: CalibrationSet | None, counts: str, args) -> None:
    print(f"quantizing {label} ...", file=sys.stderr, flush=True)
    model = copy.deepcopy(src.model)
    api.quantize(model, recipe, calib, progress=False)
    bpw = api.model_size(model).bits_per_weight
    r = api.evaluate({label: model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                     ref=src.model, progress=False)[label]  # fmt: skip
    print(f"| {label} | {bpw:.3f} | {r.ppl:.3f} | {r.ppl / fp.ppl:.3f} | {r.kl:.4f} | "
          f"{r.top1:.3f} | {counts} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

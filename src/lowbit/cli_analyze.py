"""``lowbit analyze`` (per-layer sensitivity) and ``lowbit diff`` (which layer broke a model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli_args import check_context, check_window, positive, seed
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

_ANALYZE_EPILOG = """\
examples:
  lowbit analyze smollm2-135m --recipe w4-rtn-g64 --plot sens.png
  lowbit quantize smollm2-135m --recipe w4-rtn-g64 --target-bits 3.5 --out out/mix35
  lowbit analyze waifu2x-upconv7 --recipe w8-rtn --candidates 4ch 8ch float

For each layer the recipe quantizes and each candidate format (the recipe's grid and group size
at 2, 3, 4 and 8 bits, and `float` = fp16 storage), the layer alone is quantized (RTN) and the
damage is KL(fp || q) on calibration windows (an image model: the mean squared error of its
outputs, in [0, 1], on its calibration inputs). The Hessian proxy tr(dW H dW^T) is measured
too, with its Spearman rank correlation against the damage.
"""

_DIFF_EPILOG = """\
examples:
  lowbit diff smollm2-135m out/w4 --top 5
  lowbit diff waifu2x-upconv7 out/sr          # an image model: output MSE instead of KL

Each quantized layer of Q is put back in float, one at a time, and the model's damage is
measured again: KL(fp || q) on text for a language model; for an image model (FP an image zoo
name), the mean squared error of Q's outputs against FP's on the model's evaluation inputs
(outputs in [0, 1]). Layers are ranked by how much damage their return to float removes.
"""


def add_candidates(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--candidates", nargs="+", default=["2", "3", "4", "8", "float"], metavar="C",
        help="formats to choose from: bit widths at the recipe's grid and group size (3), "
             "widths with a group size (4g192) or per channel (4ch), and/or 'float' "
             "(default: 2 3 4 8 float)",
    )  # fmt: skip


def add_analyze(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "analyze", parents=[common], help="measure each layer's sensitivity to each format",
        description="Measure how much quantizing each layer alone, in each candidate format, "
        "changes the model's output distribution (KL on calibration text).",
        epilog=_ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--recipe", required=True, help="preset or YAML: the grid and group size")
    p.add_argument("--calib", help="calibration corpus (default: bbc; not for image models)")
    p.add_argument(
        "--calib-samples",
        type=positive,
        help="windows (an image model: inputs); one forward pass over them per layer and "
        "format (default: 2 windows, 16 images)",
    )
    p.add_argument("--calib-images", metavar="DIR",
                   help="an image model: measure on crops of these images (PNG/JPEG) instead "
                   "of its own calibration inputs")  # fmt: skip
    p.add_argument(
        "--calib-seqlen", type=positive, default=512, help="tokens per window (default 512)"
    )
    add_candidates(p)
    p.add_argument("--seed", type=seed, default=0, help="seed of the calibration windows (0)")
    p.add_argument("--plot", type=Path, help="write the sensitivity plot (PNG) here")
    p.add_argument("--out", type=Path, help="write the full measurements (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot")
    p.add_argument("--top", type=positive, default=10, help="layers listed per format (default 10)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from lowbit.analysis.plot import plot_sensitivity
    from lowbit.assets.atomic import atomic_file, prepare_out
    from lowbit.calibration.group import Group
    from lowbit.cli_image import analyze_image, image_entry

    if args.out is not None and args.plot is not None and args.out.resolve() == args.plot.resolve():
        raise LowbitError(f"--out and --plot are the same file ({args.out}): the plot would "
                          f"replace the measurements")  # fmt: skip
    for path, option in ((args.out, "--out"), (args.plot, "--plot")):  # checked before hours
        if path is not None:  # of measuring
            prepare_out(path, args.overwrite, folder=False, option=option)
    entry = image_entry(args.model)
    sens = analyze_image(args, entry) if entry is not None else _analyze_text(args)
    data = sens.to_dict()
    if not Group.current().main:  # under torchrun: rank 0 writes and prints
        return 0
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(json_text(data, indent=1), encoding="utf-8")
    if args.plot:
        plot_sensitivity(sens, args.plot, title=str(args.model))
    if args.json:
        print(json_text(data))
        return 0
    measured = (f"{sens.tokens} {args.calib or 'bbc'} tokens, KL" if entry is None else
                f"{sens.tokens} calibration inputs, output MSE")  # fmt: skip
    print(f"{args.model}: {len(sens.layers)} layers x {len(sens.candidates)} formats, "
          f"{measured}")  # fmt: skip
    print(f"proxy rank correlation (Spearman, all pairs): {sens.rank_correlation():.3f}")
    for cand in sens.candidates:
        ranked = sorted(sens.layers, key=lambda n: -sens.damage[n][cand])[: args.top]
        spec = sens.candidates[cand]
        # (float storage has no quantization error for the Hessian proxy to rank)
        corr = "" if spec.format in ("fp16", "bf16") else (
            f"; proxy rank corr {sens.rank_correlation(cand):.3f}")  # fmt: skip
        print(f"\n{cand} ({spec.short()}{corr}):")
        for name in ranked:
            print(f"  {sens.damage[name][cand]:10.4g}  {name}")
    return 0


def _analyze_text(args: argparse.Namespace) -> Any:
    from lowbit import api

    if args.calib_images:
        raise LowbitError(f"--calib-images is for image models; {args.model} is a language "
                          f"model (--calib names its text)")  # fmt: skip
    src = api.load_model(args.model, kernels=False)
    if src.kind == "lowbit":
        raise LowbitError(f"{args.model} is already quantized; analyze the float model")
    if src.tokenizer is None:
        raise LowbitError(f"{args.model} has no tokenizer to read calibration text with")
    recipe = api.load_recipe(args.recipe)
    check_context(args.calib_seqlen, src.model.config, "--calib-seqlen")
    calib = api.calibration_set(src.tokenizer, args.calib or "bbc", args.calib_samples or 2,
                                args.calib_seqlen, args.seed)  # fmt: skip
    return api.analyze(src.model, recipe, calib, args.candidates, progress=not args.quiet)


def add_diff(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "diff", parents=[common], help="rank a quantized model's layers by the damage they cause",
        description="Find the layers that broke a quantized model: rank Q's quantized layers "
        "by how much of KL(FP || Q) (an image model: output MSE) disappears when each is put "
        "back in float.",
        epilog=_DIFF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("fp", metavar="FP", help="the float model")
    p.add_argument("q", metavar="Q", help="a lowbit folder quantized from FP")
    p.add_argument("--corpus", default="wiki",
                   help="text to measure on (default: wiki; not for image models)")  # fmt: skip
    p.add_argument("--seqlen", type=positive, default=512, help="window length (default: 512)")
    p.add_argument("--tokens", type=positive, default=4096, help="tokens (default: 4096)")
    p.add_argument("--top", type=positive, default=10, help="layers to list (default: 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.cli_image import image_entry, text_only

    entry = image_entry(args.fp)
    if entry is not None:
        return _image_diff(args, entry)
    text_only("diff", args.fp, args.q)
    from lowbit.analysis import layer_contributions
    from lowbit.data import corpus_ids, eval_windows, load_corpus

    check_window(args.tokens, args.seqlen)
    fp = api.load_model(args.fp, kernels=False)
    check_context(args.seqlen, fp.model.config, "--seqlen")
    q = api.load(args.q, kernels=False)
    if q.kind != "lowbit":
        raise LowbitError(f"{args.q} is not a quantized lowbit folder")
    recipe = (q.manifest or {}).get("recipe") or {}
    folded = [name for name, on in (("a rotation", recipe.get("rotate")),
                                    ("SmoothQuant factors", recipe.get("smoothquant")),
                                    ("AWQ scales", "awq" in str(recipe.get("algorithm"))))
              if on]  # fmt: skip
    if folded:
        raise LowbitError(f"{args.q} folded {' and '.join(folded)} into its weights: its layers "
                          f"are in another basis than {args.fp}'s, so swapping one back "
                          f"measures nothing; diff a folder quantized without them, or use "
                          f"lowbit analyze (before quantizing)")  # fmt: skip
    tokenizer = fp.tokenizer or q.tokenizer
    if tokenizer is None:
        raise LowbitError("neither model has a tokenizer to read the text with")
    windows = eval_windows(corpus_ids(load_corpus(args.corpus), tokenizer), args.seqlen,
                           args.tokens)  # fmt: skip
    total, ranked = layer_contributions(fp.model, q.model, windows, progress=not args.quiet)
    if args.json:
        print(json_text({"kl": total, "tokens": int(windows.numel()),
                          "layers": [c.to_dict() for c in ranked]}))  # fmt: skip
        return 0
    print(f"KL(fp || q) = {total:.5f} on {windows.numel()} {args.corpus} tokens")
    print("  KL removed   KL without  format                 layer")
    for c in ranked[: args.top]:
        print(f"  {c.reduction:10.5f}  {c.without:10.5f}  {c.format:22s} {c.layer}")
    return 0


def _image_diff(args: argparse.Namespace, entry: Any) -> int:
    """``lowbit diff`` of an image model: output MSE against FP on its evaluation inputs."""
    import math

    from lowbit import api
    from lowbit.analysis import image_contributions
    from lowbit.cli_image import float_model, refuse_text_options, same_model

    refuse_text_options(args, entry, ("corpus", "seqlen", "tokens"),
                        "measured on its evaluation inputs")  # fmt: skip
    float_model(entry, args.fp, "diff against")
    same_model(entry, args.q, "Q")
    q = api.load(args.q, kernels=False)
    if q.kind != "lowbit":
        raise LowbitError(f"{args.q} is not a quantized lowbit folder")
    inputs, _ = entry.evaluation()
    total, ranked = image_contributions(entry.load(), q.model, inputs, entry.output_range,
                                        progress=not args.quiet)  # fmt: skip
    psnr = 10 * math.log10(1 / total) if 0 < total < float("inf") else None
    if args.json:
        print(json_text({"mse": total, "psnr": psnr, "images": int(inputs.shape[0]),
                          "layers": [c.to_dict() for c in ranked]}))  # fmt: skip
        return 0
    shown = "inf" if psnr is None else f"{psnr:.2f}"
    print(f"MSE(fp, q) = {total:.3e} (PSNR {shown} dB) on {inputs.shape[0]} {entry.name} "
          f"evaluation inputs")  # fmt: skip
    print(" MSE removed  MSE without  format                 layer")
    for c in ranked[: args.top]:
        print(f"  {c.reduction:10.3e}  {c.without:10.3e}  {c.format:22s} {c.layer}")
    return 0

"""``lowbit quantize``: stream a float model from disk into a lowbit folder, block by block."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from lowbit.algorithms.rotate import KINDS, RotateOptions
from lowbit.assets import prepare_out
from lowbit.cli_analyze import add_candidates
from lowbit.cli_args import (
    add_attention_options,
    attention_override,
    check_context,
    check_window,
    given,
    positive,
    positive_float,
    refuse_attention,
)
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

log = logging.getLogger("lowbit")


def add_quantize(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quantize", parents=[common], help="quantize a model with a recipe and save it",
        description="Quantize MODEL with a recipe (preset name or YAML file) and write a lowbit "
        "folder: packed safetensors, config, tokenizer and a lowbit.json manifest. With --eval, "
        "also measure perplexity, KL and top-1 against the unquantized model and store them.",
        epilog="examples:\n  lowbit quantize smollm2-135m --recipe w4-rtn-g64 --out out/w4 --eval\n"
        "  lowbit quantize smollm2-135m --recipe w8a8-smoothquant --out out/w8a8 --calib bbc\n"
        "  lowbit quantize smollm2-135m --recipe w4a8-zeroquant-lkd --out out/w4a8 --calib bbc\n"
        "  lowbit quantize smollm2-135m --recipe w4-autoround-g64 --out out/ar --calib bbc\n"
        "  lowbit quantize smollm2-135m --recipe w4a8-best --rotate learned --out out/spin\n"
        "  lowbit quantize llama-3-8b-random --recipe w4-rtn-g64 --out out/8b --dry-run\n"
        "Calibrated algorithms (GPTQ, AWQ, AutoRound), SmoothQuant, LKD and static activation "
        "ranges read --calib "
        "text; `lowbit presets` lists every recipe.\n\n"
        "Models stream from disk: one decoder block is read, quantized, written and freed at a "
        "time, so a model larger than RAM quantizes in about one block's memory. A killed run "
        "resumes from its first unfinished block when the same command is run again (its work "
        "folder lies beside --out as .NAME.lowbit-work; --restart discards it).\n\n"
        "More processes or hosts: start the same command with torchrun, e.g.\n"
        "  torchrun --nproc-per-node 2 -m lowbit quantize smollm2-135m --recipe w4-gptq-g64 "
        "--out out/g\n"
        "Each process takes every N-th calibration batch, statistics are summed over processes "
        "(gloo; NCCL too for CUDA tensors where each process has a GPU) and each block's linears "
        "are split between them; rank 0 writes --out. The result equals one process's (LKD "
        "aside). A rerun with the same number of processes resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--recipe", required=True, help="preset name (see `lowbit presets`) or YAML file"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_attention_options(p)
    p.add_argument(
        "--rotate", choices=KINDS, metavar="KIND",
        help="fold a rotation of the residual stream into the weights first: hadamard "
        "(QuaRot), random, or learned (SpinQuant: trained on --calib text against the "
        "recipe's grid, about a forward and backward pass of the model per step); keeps the "
        "recipe's other rotate options (e.g. online: [down_proj] of w4-g64-best)",
    )  # fmt: skip
    p.add_argument("--calib", help="calibration corpus (default: bbc)")
    p.add_argument(
        "--calib-images",
        metavar="PATH",
        help="super-resolution image models: calibrate on crops of your own images (a PNG/JPEG "
        "file or a folder of them, RGB, sides of 128 pixels or more) instead of the built-in "
        "sample images",
    )
    p.add_argument(
        "--eval-images", metavar="PATH",
        help="super-resolution image models: after quantizing, score the folder on your own "
        "held-out images as `lowbit eval --images` does (each centre 512 x 512, against "
        "float32 too) and record it in the manifest; none may be a --calib-images file",
    )  # fmt: skip
    p.add_argument(
        "--calib-samples", type=positive, default=128, help="calibration windows (default: 128)"
    )
    p.add_argument(
        "--calib-seqlen", type=positive, default=512, help="tokens per window (default: 512)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-bits", type=positive_float, metavar="B",
        help="mixed precision: choose each layer's format from measured sensitivity so that the "
             "quantized layers average at most B bits/weight, scales included (see analyze)",
    )  # fmt: skip
    budget.add_argument(
        "--target-size", metavar="SIZE",
        help="mixed precision within SIZE bytes for the whole model in memory (e.g. 60MB)",
    )  # fmt: skip
    add_candidates(p)
    p.add_argument(
        "--analysis-samples", type=positive, default=None,
        help="calibration windows the sensitivity analysis measures KL on (default: 2; an "
             "image model: 16 calibration inputs, the output MSE; each trial is one forward "
             "pass over them, per layer and candidate)",
    )  # fmt: skip
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an unfinished run's work folder instead of resuming it",
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="quantize nothing: print the per-layer plan, the output size and the estimated "
             "peak memory and time (from the shapes and a timed probe of one block)",
    )  # fmt: skip
    p.add_argument(
        "--hidden-dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype of the calibration hidden states carried from block to block (default: "
             "float32; bfloat16 halves their memory, rounding each block's inputs)",
    )  # fmt: skip
    p.add_argument(
        "--spill-hidden", action="store_true",
        help="keep the calibration hidden states on disk in the work folder, one batch in "
             "memory at a time (exact; costs a write and a few reads per batch and block)",
    )  # fmt: skip
    p.add_argument(
        "--no-canary", dest="canary", action="store_false",
        help="do not record canary prompts (the float model's top-32 next-token log-probs on 4 "
             "fixed windows, canary.safetensors; an image model's: its outputs on a few fixed "
             "inputs) that `lowbit monitor` and `lowbit serve` check the deployed model "
             "against",
    )  # fmt: skip
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="stay within SIZE of peak RSS (e.g. 6GB): when the estimate exceeds it, keep the "
        "hidden states in bfloat16, then on disk; refuse to start if even that needs more",
    )
    from lowbit.cli import save_options

    save_options(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from lowbit import api
    from lowbit.calibration.group import Group
    from lowbit.cli import _need_tokenizer, row_name
    from lowbit.cli_dist import peer_failure, require_shared
    from lowbit.cli_image import image_entry, quantize_image
    from lowbit.models.load import source_folder, source_tokenizer
    from lowbit.models.source import config_json
    from lowbit.models.workdir import drop_published

    if Path(args.model).suffix == ".tflite":
        raise LowbitError(f"{args.model} is an exported LiteRT file; quantize the float model "
                          f"it was exported from")  # fmt: skip
    untargeted = args.target_bits is None and args.target_size is None
    if untargeted and (extra := given(args, "candidates", "analysis_samples")):  # (do nothing)
        raise LowbitError(f"{', '.join(extra)} choose each layer's format for --target-bits "
                          f"or --target-size; give one, or leave them out")  # fmt: skip
    torch.manual_seed(args.seed)
    if Group.current().main:
        drop_published(args.out)  # a run stopped right after it published --out
    prepare_out(args.out, args.overwrite, inputs=(args.model,))
    if args.eval:
        check_window(args.eval_tokens, args.eval_seqlen, "eval-")
    entry = image_entry(args.model)
    if entry is not None:
        refuse_attention(args, args.model)
        if args.rotate:
            raise LowbitError(f"--rotate turns a decoder's residual stream; {args.model} is an "
                              f"image model")  # fmt: skip
        return quantize_image(args, entry)
    for flag, value in (("--calib-images", args.calib_images), ("--eval-images",
                                                                 args.eval_images)):  # fmt: skip
        if value:
            raise LowbitError(f"{flag} is for image models; {args.model} is a language model "
                              f"(--calib and --eval-corpus name its text)")  # fmt: skip
    calib_flags = ["--calib"] if args.calib is not None else []  # (its default is set here)
    args.calib = args.calib or "bbc"
    recipe = api.load_recipe(args.recipe)
    attention = attention_override(args)
    if attention is not None:  # --kv-bits: the recipe's attention block, saved with the model
        recipe = dataclasses.replace(recipe, attention=attention)
    if args.rotate:  # the recipe's other rotate options kept; asked for, so not if_possible
        rotate = dataclasses.replace(recipe.rotate or RotateOptions(), kind=args.rotate,
                                     if_possible=False)  # fmt: skip
        recipe = dataclasses.replace(recipe, rotate=rotate)
    if args.max_memory:
        _limit_mb(args.max_memory)  # a malformed size fails before any work
    if args.target_size:  # (before the analysis, which can take hours)
        from lowbit.analysis import parse_size

        parse_size(args.target_size)
    if args.target_size or args.target_bits is not None:
        api.check_budget_recipe(recipe)
    folder, _ = source_folder(args.model)
    if args.eval:
        _check_eval_text(args, folder)
        require_shared(Path(args.out), "--eval")  # every rank evaluates the written folder
    mixed = args.target_bits is not None or args.target_size is not None
    calibration = None
    if api.needs_calibration(recipe) or mixed:
        if args.eval:
            from lowbit.data import disjoint_texts

            disjoint_texts(args.calib, args.eval_corpus, "--calib, --eval-corpus")
        tokenizer = source_tokenizer(folder)
        if tokenizer is None:
            raise LowbitError(f"{args.model} has no tokenizer; calibration needs one")
        check_context(args.calib_seqlen, config_json(folder), "--calib-seqlen")
        calibration = api.calibration_set(
            tokenizer, args.calib, args.calib_samples, args.calib_seqlen, args.seed
        )
    elif ignored := calib_flags + given(args, "calib_samples", "calib_seqlen"):
        log.info("%s uses no calibration data; %s ignored", recipe.algorithm, ", ".join(ignored))
    summary = None
    if mixed:
        src = api.load_model(args.model)
        recipe, summary = _mixed(args, api, src, recipe, calibration)
        del src
    if args.dry_run or args.max_memory:
        plan = _fit_memory(args, api, recipe, calibration)
        if args.dry_run:
            print(json_text(plan, indent=1) if args.json else render_plan(plan))
            return 0
        _check_memory(plan, args.max_memory)
    out, report = api.quantize_to(
        args.model, recipe, args.out, calibration, args.seed, args.overwrite, args.restart,
        progress=not args.quiet, analysis=summary, hidden_dtype=args.hidden_dtype,
        spill=args.spill_hidden, canary=args.canary,
    )  # fmt: skip
    metrics, results, sizes = {}, None, None
    if not Group.current().main and not args.eval:  # under torchrun rank 0 reports
        return 0
    if args.eval:
        src = api.load_model(args.model)
        _need_tokenizer(src)
        quantized = api.load(out, kernels=False).model
        name = row_name(args, recipe)
        try:
            results = api.evaluate(
                {"float": src.model, name: quantized}, src.tokenizer, args.eval_corpus,
                args.eval_seqlen, args.eval_tokens, ref=src.model, progress=not args.quiet,
            )  # fmt: skip
        except RuntimeError as exc:  # a peer lost here: the folder is written, not resumable
            if not peer_failure(exc):
                raise
            raise LowbitError(f"another process of the job failed while evaluating; {out} is "
                              f"written, without its figures: run lowbit eval {out} --ref "
                              f"{args.model} for them") from None  # fmt: skip
        metrics = {"eval": results[name].to_dict(), "reference_eval": results["float"].to_dict()}
        sizes = {"float": api.model_size(src.model), name: api.model_size(quantized)}
        if Group.current().main:  # under torchrun every rank evaluates, rank 0 writes
            api.add_metrics(out, metrics)
    from lowbit.cli import print_summary

    return print_summary(args, recipe, out, report, metrics, results, sizes)


def _check_eval_text(args: argparse.Namespace, folder: Path) -> None:
    """--eval's text read and cut into windows before any work (a wrong corpus found after
    the run left a folder without its figures)."""
    from lowbit.data import corpus_ids, eval_windows, load_corpus
    from lowbit.models.load import source_tokenizer
    from lowbit.models.source import config_json

    tokenizer = source_tokenizer(folder)
    if tokenizer is None:
        raise LowbitError(f"{args.model} has no tokenizer; --eval needs one")
    check_context(args.eval_seqlen, config_json(folder), "--eval-seqlen")
    try:
        eval_windows(corpus_ids(load_corpus(args.eval_corpus), tokenizer), args.eval_seqlen,
                     args.eval_tokens)  # fmt: skip
    except LowbitError as exc:
        raise LowbitError(f"--eval-corpus: {str(exc).replace('--seqlen', '--eval-seqlen')}"
                          ) from None  # fmt: skip


def _limit_mb(limit: str) -> float:
    from lowbit.analysis import parse_size

    return parse_size(limit, "--max-memory") / 2**20


def _fit_memory(args: argparse.Namespace, api: Any, recipe: Any, calibration: Any) -> dict:
    """The estimate of the run as asked; under ``--max-memory``, of the first way of holding the
    calibration hidden states that fits: as asked, in bfloat16, on disk (``args`` follows)."""
    show = not args.quiet
    plan = api.estimate(args.model, recipe, calibration, show, args.hidden_dtype, args.spill_hidden,
                        args.canary)  # fmt: skip
    if not args.max_memory or calibration is None or args.spill_hidden:
        return plan
    limit = _limit_mb(args.max_memory)
    ways = [("bfloat16", False)] if args.hidden_dtype == "float32" else []
    for dtype, spill in [*ways, (args.hidden_dtype, True)]:
        if plan["peak_rss_mb"] <= limit:
            break
        plan = api.estimate(args.model, recipe, calibration, False, dtype, spill, args.canary)
        if plan["peak_rss_mb"] <= limit:
            how = "on disk" if spill else f"in {dtype}"
            log.warning("keeping the calibration hidden states %s to stay within --max-memory "
                        "%s", how, args.max_memory)  # fmt: skip
            args.hidden_dtype, args.spill_hidden = dtype, spill
    return plan


def _check_memory(plan: dict[str, Any], limit: str | None) -> None:
    if limit is None:
        return
    allowed = _limit_mb(limit)
    if plan["peak_rss_mb"] > allowed:
        how = " even with its hidden states on disk" if plan["hidden"]["spilled"] else ""
        raise LowbitError(f"this run needs about {plan['peak_rss_mb']:,.0f} MB at its peak{how}, "
                          f"more than --max-memory {limit} ({allowed:,.0f} MB); use a machine "
                          f"with more memory")  # fmt: skip


def render_plan(plan: dict[str, Any]) -> str:
    """The dry run's plan as text: per-format totals, then the estimate."""
    dtypes = ", ".join(plan["source_dtypes"])
    lines = [f"{plan['model']}: {plan['params']:,} parameters, {plan['blocks']} blocks, "
             f"source {plan['source_bytes'] / 1e9:.2f} GB ({dtypes})"]  # fmt: skip
    for fmt, row in plan["formats"].items():
        lines.append(f"  {fmt:24s} {row['layers']:5d} layers {row['weights']:>15,} weights "
                     f"{row['bits_per_weight']:.3f} bits/w")  # fmt: skip
    lines += [
        f"quantized layers: {plan['bits_per_weight']:.3f} bits/weight",
        f"output: {plan['output_bytes']:,} bytes; disk beside --out at the end: about "
        f"{plan['disk_bytes'] / 1e9:,.2f} GB (work folder + the assembled folder)",
        f"estimated peak RSS: {plan['peak_rss_mb']:,.0f} MB (calibration hidden states "
        f"{'on disk' if plan['hidden']['spilled'] else 'in memory'}, "
        f"{plan['hidden']['dtype']})",
        f"estimated time: {plan['seconds']:,.0f} s with {plan['threads']} threads "
        f"(probe: a block took {plan['probe']['block_seconds']:.2f} s)",
    ]
    if plan.get("learned_rotation"):
        lines.append("  plus the learned rotation's training (rotate.steps passes forward and "
                     "back through the whole model; not probed; memory a rough bound)")  # fmt: skip
    if plan.get("tuning"):
        lines.append("  plus the end-to-end tuning (tune.steps passes forward and back through "
                     "the whole model and the float one forward; not probed; memory a rough "
                     "bound)")  # fmt: skip
    return "\n".join(lines)


def _mixed(args: argparse.Namespace, api: Any, src: Any, recipe: Any, calibration: Any) -> Any:
    """Analyse sensitivity on the first calibration windows and choose per-layer formats
    (the analysis holds the float model in memory)."""
    from lowbit.calibration import CalibrationSet

    n = min(args.analysis_samples or 2, len(calibration.windows))
    sample = CalibrationSet(calibration.corpus, n, calibration.seqlen, calibration.seed,
                            calibration.windows[:n])  # fmt: skip
    from lowbit.models.experts import experts_to_linears
    from lowbit.models.rotate import fitted_rotation, rotate_model

    experts_to_linears(src.model)  # a mixture's experts as the rotation plans them
    recipe = dataclasses.replace(recipe, rotate=fitted_rotation(recipe.rotate, src.model))
    if recipe.rotate is not None:  # measured in the basis the model is quantized in
        if recipe.rotate.kind == "learned":
            raise LowbitError("--target-bits/--target-size measure sensitivity in the rotated "
                              "basis, which a learned rotation only has after training; use "
                              "rotate kind hadamard with mixed precision")  # fmt: skip

        rotate_model(src.model, recipe.rotate)
    sens = api.analyze(src.model, recipe, sample, args.candidates, progress=not args.quiet)
    return allocate_formats(args, api, src.model, recipe, sens)


def allocate_formats(args: argparse.Namespace, api: Any, model: Any, recipe: Any,
                     sens: Any) -> tuple[Any, dict]:  # fmt: skip
    """(mixed recipe, summary) within ``--target-bits`` / ``--target-size`` from a measured
    sensitivity (language and image models alike), logged."""
    from lowbit.analysis import parse_size

    target_bytes = parse_size(args.target_size) if args.target_size else None
    mixed, summary = api.mixed_recipe(model, recipe, sens, args.target_bits, target_bytes)
    counts = ", ".join(f"{c}: {k}" for c, k in summary["layers_per_candidate"].items() if k)
    log.info("mixed precision: %.3f bits/weight (budget %.3f); layers %s",
             summary["bits_per_weight"], summary["budget_bits_per_weight"], counts)  # fmt: skip
    return mixed, summary

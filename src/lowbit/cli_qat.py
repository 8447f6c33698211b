"""``lowbit qat``: quantization-aware training from an RTN recipe, then a packed lowbit folder."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from lowbit.assets import prepare_out
from lowbit.cli_args import check_context, check_window, positive
from lowbit.errors import LowbitError

_EPILOG = """\
example:
  lowbit qat smollm2-135m --recipe w3-rtn-g64 --train shakespeare --steps 200 \\
      --out out/w3-qat --eval

Training text must be neither the evaluation corpus (wiki) nor calibration text; the default
loss (kl) distils the float model's next-token distribution, so the text only has to be
ordinary language. Each step trains on --batch-size windows of --seqlen tokens.
"""


def add_qat(sub: Any, common: argparse.ArgumentParser) -> None:
    from lowbit.cli import save_options

    p = sub.add_parser(
        "qat", parents=[common], help="quantization-aware training, then save packed",
        description="Fine-tune MODEL on the grid of an RTN recipe (fake-quantized weights, "
        "straight-through gradients, learnable scales and offsets), then pack it exactly and "
        "write a lowbit folder. With --eval, measure it against the float model.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--recipe", required=True, help="RTN weight recipe: preset name or YAML file")
    p.add_argument("--train", default="shakespeare", help="training corpus (default: shakespeare)")
    p.add_argument("--steps", type=positive, default=200, help="optimizer steps (default: 200)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    p.add_argument("--batch-size", type=positive, default=2, help="windows per step (default: 2)")
    p.add_argument("--seqlen", type=positive, default=128, help="tokens per window (default: 128)")
    p.add_argument(
        "--loss", choices=["kl", "ce", "ce+kl"], default="kl",
        help="kl: distil the float model (default); ce: next-token loss on the text",
    )  # fmt: skip
    p.add_argument("--fixed-scales", action="store_true", help="train weights only, not scales")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    save_options(p)
    p.set_defaults(func=cmd_qat)


def cmd_qat(args: argparse.Namespace) -> int:
    import torch

    from lowbit import api
    from lowbit.cli_image import text_only

    text_only("qat", args.model)
    from lowbit.cli import _need_tokenizer, finish_quantize

    torch.manual_seed(args.seed)
    prepare_out(args.out, args.overwrite)
    if args.eval:
        check_window(args.eval_tokens, args.eval_seqlen, "eval-")
    if args.eval:
        from lowbit.data import disjoint_texts

        disjoint_texts(args.train, args.eval_corpus, "--train, --eval-corpus")
    recipe = api.load_recipe(args.recipe)
    options = api.QATOptions(args.steps, args.lr, args.batch_size, args.loss,
                             not args.fixed_scales)  # fmt: skip
    src = api.load_model(args.model, kernels=False)
    if src.kind == "lowbit":
        raise LowbitError(f"{args.model} is already quantized; start from the float model")
    _need_tokenizer(src, "training on --train text")
    check_context(args.seqlen, src.model.config, "--seqlen")
    if args.eval:
        check_context(args.eval_seqlen, src.model.config, "--eval-seqlen")
    train = api.calibration_set(src.tokenizer, args.train, args.steps * args.batch_size,
                                args.seqlen, args.seed,
                                "--steps x --batch-size or --seqlen")  # fmt: skip
    ref = copy.deepcopy(src.model) if args.eval else None
    canary = api.text_canary(src.model, src.tokenizer)  # the float model's, as quantize records
    report = api.qat(src.model, recipe, train, options, progress=not args.quiet)
    return finish_quantize(args, recipe, src, ref, report, canary)

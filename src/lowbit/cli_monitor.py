"""``lowbit monitor``: does a deployed lowbit folder still answer as it did when quantized?"""

from __future__ import annotations

import argparse
from typing import Any

from lowbit.errors import LowbitError
from lowbit.json_out import json_text

_EPILOG = """\
examples:
  lowbit monitor out/w4                 # exit 0: ok, 1: degraded, 2: error
  lowbit monitor out/w4 --json          # one JSON object (for cron jobs and alerting)
  lowbit monitor out/w4 --reference     # the plain-PyTorch reference path instead of kernels

At quantize time lowbit records the float model's top-32 next-token log-probabilities on 4
fixed windows of tokens (canary.safetensors) and the KL the quantized model had against them.
This command loads the folder as `lowbit serve` does, on this machine's kernels, and scores it
again: a KL above the recorded tolerance (1.5 x the KL at quantize time + 1e-4) means the
weights, the kernels or the runtime no longer compute what was validated. `lowbit serve` runs
the same check at start and every --canary-every minutes (/health, lowbit_canary_* metrics).

An image model's folder records the float model's outputs on a few fixed inputs (a
generator's seeded latents, a super-resolution model's calibration crops) and is scored by
PSNR against them: below the recorded tolerance (the PSNR of 1.5 x the squared error at
quantize time + 1e-8) it is degraded.
"""


def add_monitor(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "monitor", parents=[common], help="check a lowbit folder against its canary prompts",
        description="Score DIR on the canary prompts recorded when it was quantized and say "
        "whether it still reproduces the float model's answers within the recorded tolerance.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--tolerance", type=float,
                   help="override the recorded KL tolerance (an image model's folder: the least "
                   "PSNR in dB)")  # fmt: skip
    p.add_argument("--reference", action="store_true",
                   help="run the plain-PyTorch reference layers, not the fast kernels")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.eval.canary import check

    if args.tolerance is not None and not args.tolerance >= 0:
        raise LowbitError(f"--tolerance must be 0 or more, got {args.tolerance}")
    src = api.load(args.folder, kernels=not args.reference)
    if src.kind != "lowbit" or src.folder is None:
        raise LowbitError(f"{args.folder} is not a lowbit folder (canary prompts are recorded "
                          f"by `lowbit quantize`)")  # fmt: skip
    result = check(src.model, src.folder, src.manifest or {}, args.tolerance)
    if args.json:
        print(json_text({"folder": str(src.folder), **result.to_dict()}))
    else:
        print(result.line())
    return 0 if result.ok else 1

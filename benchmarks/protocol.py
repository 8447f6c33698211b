"""The quality tables' shared protocol options: calibration on `bbc` (128 windows of 512
tokens), evaluation on `wiki` (16,384 tokens in windows of 2,048), as the README's tables use."""

from __future__ import annotations

import argparse


def add_protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="bbc")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=2048)


def start(args: argparse.Namespace, table: dict) -> tuple:
    """Check ``args.rows`` against ``table``, load the model, the calibration windows and the
    float model's figures, and print the protocol line; (source, calibration, float result)."""
    import sys

    from lowbit import api

    unknown = [r for r in args.rows or [] if r not in table]
    if unknown:
        sys.exit(f"unknown row {unknown[0]!r}; rows: {', '.join(table)}")
    src = api.load_model(args.model, kernels=False)
    calib = api.calibration_set(src.tokenizer, args.calib, args.calib_samples, args.calib_seqlen)
    return src, calib, float_figures(args, src)


def float_figures(args: argparse.Namespace, src):
    """Score the float model on the protocol's windows and print the protocol line."""
    import torch

    from lowbit import api

    fp = api.evaluate({"float": src.model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                      progress=False)["float"]  # fmt: skip
    print(f"model {args.model}; calibration {args.calib}: {args.calib_samples} windows x "
          f"{args.calib_seqlen} tokens (seed 0); evaluation {fp.corpus} (sha256 "
          f"{fp.corpus_sha256[:12]}): {fp.windows} windows x {fp.seqlen} = {fp.tokens} tokens; "
          f"float ppl {fp.ppl:.3f}; {torch.get_num_threads()} threads\n", flush=True)  # fmt: skip
    return fp

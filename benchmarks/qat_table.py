"""QAT on the default model: RTN starting point, the fake-quant model after training, and the
packed model converted from it, scored against the float model on the same `wiki` windows.

    .venv/bin/python benchmarks/qat_table.py [--recipe w3-rtn-g64] [--steps 200] [--lr 2e-5]
        [--train shakespeare] [--seqlen 128] [--batch-size 2] [--tokens 16384]

Training text (`shakespeare` by default) is neither the evaluation text (`wiki`) nor the
calibration text (`bbc`); the default loss distils the float model (KL), so no labels are used.
The packed row must equal the fake-quant row: packing reproduces the trained weights exactly.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

from lowbit import api
from lowbit.eval import model_size
from lowbit.pipeline.qat import QATOptions, pack_model, train_fake_quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w3-rtn-g64")
    p.add_argument("--train", default="shakespeare")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--loss", default="kl", choices=["kl", "ce", "ce+kl"])
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    src = api.load_model(args.model, kernels=False)
    recipe = api.load_recipe(args.recipe)

    def score(name, model):
        return api.evaluate({name: model}, src.tokenizer, args.corpus, args.eval_seqlen,
                            args.tokens, ref=src.model, progress=False)[name]  # fmt: skip

    rtn = copy.deepcopy(src.model)
    api.quantize(rtn, recipe, progress=False)
    rows = [("RTN (start)", score("rtn", rtn), model_size(rtn).bits_per_weight, 0.0)]
    print(f"model {args.model}; recipe {args.recipe}; evaluation {rows[0][1].corpus}: "
          f"{rows[0][1].tokens} tokens in windows of {args.eval_seqlen}; QAT on {args.train}: "
          f"{args.steps} steps x {args.batch_size} windows x {args.seqlen} tokens, lr {args.lr}, "
          f"loss {args.loss}, learnable scales\n", flush=True)  # fmt: skip
    del rtn
    train = api.calibration_set(src.tokenizer, args.train, args.steps * args.batch_size,
                                args.seqlen)  # fmt: skip
    model = copy.deepcopy(src.model)
    options = QATOptions(args.steps, args.lr, args.batch_size, args.loss)
    t0 = time.perf_counter()
    fakes, losses = train_fake_quant(model, recipe, train, options, progress=True)
    seconds = time.perf_counter() - t0
    fake = score("fake", model)
    pack_model(model, fakes, recipe)
    packed = score("packed", model)
    bpw = model_size(model).bits_per_weight
    rows += [("QAT, fake-quant", fake, bpw, seconds), ("QAT, packed", packed, bpw, seconds)]
    print(
        f"loss (KL per token, mean of 10 steps): first {losses[0]:.4f}, "
        f"last {sum(losses[-10:]) / 10:.4f}\n"
    )
    print("| model | bits/w | ppl | KL | top-1 | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, b, s in rows:
        print(f"| {name} | {b:.3f} | {r.ppl:.3f} | {r.kl:.4f} | {r.top1:.3f} | {s:.0f} |")


if __name__ == "__main__":
    main()

"""Round-to-nearest on the default model: quality and size of each format, measured in one run.

Every quantized model is scored against the float model on the same windows (one float pass per
window, shared). Prints a Markdown table: bits/weight of the quantized layers (scales and zeros
included), bytes of the saved weights file (embeddings and norms stay fp32), perplexity,
KL(fp || q) per token, top-1 agreement.

    .venv/bin/python benchmarks/rtn_table.py [--tokens 16384] [--seqlen 2048]

Reminder (see the zoo docs): the default model's weights already lie on a 4-bit group-32 grid,
so the w4-rtn-g32 row shows losslessness, not quality; the other rows are the evidence.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time

from lowbit import api
from lowbit.eval import format_table, model_size

DEFAULT_RECIPES = ["w4-rtn-g64", "w4-rtn-g32", "w4-rtn-channel", "w3-rtn-g64", "w3-rtn-g32"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = api.load_model(args.model)
    models, rows_info = {"float": src.model}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            model = copy.deepcopy(src.model)
            start = time.perf_counter()
            report = api.quantize(model, name, progress=False)
            seconds = time.perf_counter() - start
            folder = api.save(model, os.path.join(tmp, name), report, source=src)
            disk = os.path.getsize(folder / "model.safetensors")
            rows_info[name] = (model_size(model).bits_per_weight, disk, seconds)
            models[name] = model
    results = api.evaluate(
        models, src.tokenizer, args.corpus, args.seqlen, args.tokens, ref=src.model
    )
    first = results["float"]
    print(f"\nmodel {args.model}; corpus {first.corpus} (sha256 {first.corpus_sha256[:12]}); "
          f"{first.windows} windows x {first.seqlen} = {first.tokens} tokens; "
          f"KL and top-1 against the float model on the same windows\n")  # fmt: skip
    fp_file = src.folder / "model.safetensors" if src.folder else None
    fp_disk = os.path.getsize(fp_file) if fp_file else model_size(src.model).total_bytes
    rows = [["float (fp32)", 32.0, fp_disk, first.ppl, 1.0, None, None, None]]
    for name in args.recipes:
        bpw, disk, seconds = rows_info[name]
        r = results[name]
        rows.append([name, bpw, disk, r.ppl, r.ppl / first.ppl, r.kl, r.top1, round(seconds, 1)])
    header = ["recipe", "bits/w", "file bytes", "ppl", "x fp", "KL", "top-1", "quantize s"]
    print(format_table(header, rows, markdown=True))


if __name__ == "__main__":
    main()

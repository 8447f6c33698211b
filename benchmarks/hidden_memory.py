"""Where the calibration hidden states live, and what it costs: float32 or bfloat16 in memory,
or float32 spilled to disk (`--spill-hidden`).

Each row is one `lowbit quantize --dry-run --json` child process: the dry run's probe embeds all
calibration windows and quantizes the first two decoder blocks for real, so its peak RSS and
block time are measured, not modelled. With `--full`, each way also runs to the end (its own
child process, its own peak RSS) and the outputs are compared byte for byte.

    python benchmarks/hidden_memory.py                         # smollm2-135m, GPTQ, bbc 32 x 2048
    python benchmarks/hidden_memory.py --samples 32 --seqlen 512 --full
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {  # name: extra quantize arguments
    "float32 in memory": [],
    "bfloat16 in memory": ["--hidden-dtype", "bfloat16"],
    "float32 on disk": ["--spill-hidden"],
}


def lowbit(*args: str) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def main() -> None:
    from lowbit.eval.table import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w4-gptq-g64")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--full", action="store_true", help="also run each way to the end")
    args = parser.parse_args()
    calib = ["--calib", "bbc", "--calib-samples", str(args.samples),
             "--calib-seqlen", str(args.seqlen)]  # fmt: skip
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in WAYS.items():
            out = Path(tmp) / name.replace(" ", "-")
            base = ["quantize", args.model, "--recipe", args.recipe, "--out", str(out), *calib]
            plan = lowbit(*base, *extra, "--dry-run")
            row = [name, f"{plan['peak_rss_mb']:,.0f}", f"{plan['probe']['block_seconds']:.1f}",
                   f"{plan['seconds']:,.0f}"]  # fmt: skip
            if args.full:
                start = time.perf_counter()
                got = lowbit(*base, *extra)
                row += [f"{time.perf_counter() - start:,.0f}", f"{got['peak_rss_mb']:,.0f}"]
                outs[name] = out
            rows.append(row)
            print(" | ".join(row), flush=True)
        if args.full:
            first = outs["float32 in memory"]
            disk = outs["float32 on disk"]
            same = all(filecmp.cmp(p, disk / p.name, shallow=False)
                       for p in first.glob("model*"))  # fmt: skip
            print(f"float32 on disk equals float32 in memory byte for byte: {same}")
    heads = ["hidden states", "probe peak RSS MB", "probe block s", "est. run s"]
    heads += ["run s", "run peak RSS MB"] if args.full else []
    print(f"{args.model}, {args.recipe}, calibration bbc {args.samples} x {args.seqlen}")
    print(format_table(heads, rows))


if __name__ == "__main__":
    main()

"""The online Hadamard transform before down_proj (``rotate: {online: [down_proj]}``): what it
costs next to the layer it precedes, one run.

For each down_proj width (the default model's 1536 = 12·128 and TinyLlama-1.1B's 5632 =
44·128) and number of input rows, the native transform (``lowbit_cpu::hadamard_transform``),
its plain-PyTorch reference (``online_hadamard``) and the float32 down_proj matmul itself run in
turn, `--reps` times; the median time of each is printed, with the transform's cost as a
fraction of the matmul's.

    .venv/bin/python benchmarks/hadamard.py [--rows 1 16 512] [--threads 2] [--reps 21]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowbit.kernels.build import native_ops
from lowbit.kernels.hadamard import hadamard_transform
from lowbit.primitives.hadamard import online_block, online_hadamard

WIDTHS = {"smollm2-135m down (576x1536)": (576, 1536), "1.1B down (2048x5632)": (2048, 5632)}


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    args = p.parse_args()
    if not native_ops():
        sys.exit("lowbit's CPU kernels are not built here: nothing native to measure")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; median of {args.reps}; microseconds per call\n")
    print("| layer | rows | native transform | PyTorch reference | fp32 matmul | native / matmul |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (out, n) in WIDTHS.items():
        block = online_block(n)
        w = torch.randn(out, n)
        for rows in args.rows:
            x = torch.randn(rows, n)
            native = timed(lambda x=x, b=block: hadamard_transform(x, b), args.reps)
            ref = timed(lambda x=x, b=block: online_hadamard(x, b), args.reps)
            mm = timed(lambda x=x, w=w: F.linear(x, w), args.reps)
            print(f"| {name} | {rows} | {native * 1e6:.1f} | {ref * 1e6:.1f} | {mm * 1e6:.1f} | "
                  f"{native / mm:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Decode-sized products (one row of x) of 4- and 8-bit layers: the bytes they read per second
against what a plain read of memory gives on this machine.

A decode step reads every weight once, so its GEMVs should stream at the memory's pace. For each
weight shape of a model's decode step (q/k/v and gate/up fused as the decode loop runs them,
and the output head), enough random codes to hold ``--megabytes`` (more than the last-level
cache, so each call reads from memory) are called in turn, one row of x each: 4-bit symmetric
codes with float16 scales per group of 32 (Q4_0's grid), 8-bit codes per output channel
(``w8-rtn``'s) and per group of 32 (the int8 head's, Q8_0's grid), on int8 inputs per block
of 32 as the decode loop calls them, and the 8-bit ones again on float inputs (the op's
``act8`` off, which lowbit's convolutions take). Each round times one pass over the copies
and, beside it, torch's float32 sum of a buffer of the same size
(``lowbit.eval.machine.memory_bandwidth_gbs``, ``lowbit bench``'s bound); medians over the
rounds. Each pass runs twice, alternating within every round: over the copies as torch allocated
them (4 KB pages) and over the same codes moved into one block on 2 MB pages, as a loaded
model's tensors are (:func:`lowbit.models.arena.move_into_arena`; where the system gives no
huge pages the two columns read alike). The native op is called without ``affine_linear``'s
Python wrapper (it adds ~30 us per call), though through torch's dispatcher, which the fused
decode step skips. Run once as is and once with ``LOWBIT_KERNEL_ISA=avx2``.

    .venv/bin/python benchmarks/decode_gemv.py [--shapes tinyllama|smollm2] \\
        [--megabytes 768] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

from lowbit.eval import format_table
from lowbit.eval.machine import memory_bandwidth_gbs
from lowbit.kernels import affine
from lowbit.kernels.build import native_ops
from lowbit.models.arena import move_into_arena
from prefill_gemm import SHAPES, weight

HEADS = {"smollm2": (49152, 576), "tinyllama": (32000, 2048)}  # (vocabulary, hidden)


def nbytes(aw: affine.AffineWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (aw.w, aw.scale, aw.offset))


def row(n: int, k: int, bits: int, group: int, act8: bool, megabytes: int, rounds: int,
        seed: int) -> list[str]:  # fmt: skip
    first = weight(n, k, seed, bits, group)
    copies = max(2, -(-megabytes * 2**20 // nbytes(first)))
    # the copies share the grid and differ in memory only: clones of one random weight
    weights = [first] + [
        dataclasses.replace(first, w=first.w.clone(), scale=first.scale.clone(),
                            offset=first.offset.clone())
        for _ in range(copies - 1)
    ]  # fmt: skip
    holder = nn.Module()  # clones of the copies, moved into one block on huge pages
    for i, aw in enumerate(weights):
        setattr(holder, f"w{i}", dataclasses.replace(aw, w=aw.w.clone(), scale=aw.scale.clone(),
                                                     offset=aw.offset.clone()))  # fmt: skip
    move_into_arena(holder)
    huge = [getattr(holder, f"w{i}") for i in range(copies)]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(100 + seed))
    op = torch.ops.lowbit_cpu.affine_linear

    def call(aw: affine.AffineWeight) -> None:
        op(x, aw.w, aw.scale, aw.offset, aw.group, aw.bits, act8)

    def rate(copies: list[affine.AffineWeight]) -> float:
        t0 = time.perf_counter()
        for aw in copies:
            call(aw)
        return nbytes(first) * len(copies) / (time.perf_counter() - t0) / 1e9

    rate(weights), rate(huge)  # fault the pages in
    rates, huge_rates, probes = [], [], []
    for _ in range(rounds):
        probes.append(memory_bandwidth_gbs(megabytes, repeats=1))
        rates.append(rate(weights))
        huge_rates.append(rate(huge))
    gbs, probe = statistics.median(rates), statistics.median(probes)
    huge_gbs = statistics.median(huge_rates)
    us = nbytes(first) / gbs / 1e3
    return [f"{n}x{k}", str(bits), str(first.group), "int8" if act8 else "float",
            f"{nbytes(first) / 1e6:.2f}", f"{us:.0f}", f"{gbs:.1f}", f"{huge_gbs:.1f}",
            f"{probe:.1f}", f"{gbs / probe:.0%}", f"{huge_gbs / probe:.0%}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument(
        "--megabytes",
        type=int,
        default=768,
        help="weights read per pass (more than the last-level cache)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.megabytes < 1 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--megabytes, --rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    if not native_ops():
        raise SystemExit("lowbit's native kernels are not available here: nothing to measure")
    isa = torch.ops.lowbit_cpu.kernel_isa()
    # (out, in, bits, group (0: per row), int8 inputs)
    shapes = [(n, k, 4, 32, True) for n, k in SHAPES[args.shapes]]
    first, head = SHAPES[args.shapes][0], HEADS[args.shapes]
    shapes += [(*head, 8, 32, True), (*head, 8, 32, False), (*first, 8, 0, True),
               (*first, 8, 0, False)]  # fmt: skip
    rows = [row(*shape, args.megabytes, args.rounds, i) for i, shape in enumerate(shapes)]
    print(f"one row of x, {args.threads} threads, lowbit kernels: {isa}, {args.megabytes} MB of "
          f"weights per pass, {args.rounds} rounds (pass, then plain read), medians")  # fmt: skip
    header = ["out x in", "bits", "group", "inputs", "MB per call", "us per call", "GEMV GB/s",
              "2 MB pages GB/s", "plain read GB/s", "of plain read",
              "2 MB pages, of plain read"]  # fmt: skip
    print(format_table(header, rows))


if __name__ == "__main__":
    main()

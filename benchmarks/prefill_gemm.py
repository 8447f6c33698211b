"""Prefill-sized products of 4- and 8-bit layers: float32 against the two paths of the affine op.

For each weight shape (out, in) of a model's linear layers (q/k/v and gate/up fused as the
decode loop runs them), random symmetric 4-bit codes with float16 scales per group of 32 (Q4_0's
grid; ``--bits 8``: symmetric 8-bit codes with one scale per output channel, ``w8-rtn``'s
grid), and a prompt of M rows: float32 ``F.linear`` on the dequantized weight, the integer GEMM
on int8 inputs (``act8=True``, the decode loop's prompts) and the float path (``act8=False``:
codes dequantized tile by tile into torch's GEMM, what evaluation windows run), alternating
(one call each per round), medians. Run once as is and once with ``LOWBIT_KERNEL_ISA=avx2``
(AVX2 alone) or ``avxvnni`` (AVX2 with AVX-VNNI, as Intel's client CPUs), adding
``MKL_ENABLE_INSTRUCTIONS=AVX2`` to hold float32 to AVX2 as well.

    .venv/bin/python benchmarks/prefill_gemm.py [--rows 512] \\
        [--shapes smollm2|tinyllama] [--bits 4|8] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.eval import format_table
from lowbit.kernels import affine
from lowbit.kernels.build import native_ops

SHAPES = {  # (out, in) per call of one block: qkv, o_proj, gate_up, down
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
    "tinyllama": [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)],
}


def weight(n: int, k: int, seed: int, bits: int, group: int = 0) -> affine.AffineWeight:
    """Random symmetric codes; ``group`` 0: Q4_0's 32 for 4-bit codes, one per row for 8-bit."""
    g = torch.Generator().manual_seed(seed)
    group = group or (32 if bits == 4 else k)
    low = 0 if bits == 4 else 1  # Q4_0's codes -8..7; a symmetric int8 grid's -127..127
    codes = torch.randint(low, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half().float()
    return affine.to_affine(codes, scale, -(2 ** (bits - 1)) * scale, (1, group), bits)


def medians(calls: dict, rounds: int) -> dict[str, float]:
    """ms per call, alternating one call of each per round, medians (after one warm-up)."""
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def row(n: int, k: int, m: int, rounds: int, seed: int, bits: int) -> list[str]:
    aw = weight(n, k, seed, bits)
    w = affine.affine_dequantize_reference(aw)[:, :k].contiguous()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + seed))
    ms = medians({"fp32": lambda: F.linear(x, w),
                  "act8": lambda: affine.affine_linear(x, aw, act8=True),
                  "tiles": lambda: affine.affine_linear(x, aw, act8=False)}, rounds)  # fmt: skip
    ref = F.linear(x, w)
    err = (affine.affine_linear(x, aw, act8=True) - ref).norm() / ref.norm()
    return [f"{n}x{k}", f"{ms['fp32']:.2f}", f"{ms['act8']:.2f}",
            f"x{ms['fp32'] / ms['act8']:.2f}", f"{ms['tiles']:.2f}",
            f"x{ms['fp32'] / ms['tiles']:.2f}", f"{err:.1e}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[args.shapes]
    rows = [row(n, k, args.rows, args.rounds, i, args.bits) for i, (n, k) in enumerate(shapes)]
    isa = torch.ops.lowbit_cpu.kernel_isa() if native_ops() else "reference (no native kernels)"
    print(f"{args.bits}-bit codes, {args.rows} rows, {args.threads} threads, lowbit kernels: "
          f"{isa}, {args.rounds} alternating rounds, medians")  # fmt: skip
    header = ["out x in", "fp32 ms", "int8-input GEMM ms", "speed-up", "float tiles ms",
              "speed-up", "rel. error, int8 inputs"]  # fmt: skip
    print(format_table(header, rows))


if __name__ == "__main__":
    main()

"""W8A8 linear layers on this CPU: lowbit's int8 kernels against float32 and fbgemm, one run.

For each layer shape (the default model's and TinyLlama-1.1B's) and number of input rows,
the candidates run in turn, `--reps` times, and the median time of each is printed with its
speed relative to float32 `F.linear` measured in the same rounds, and its error against
float32 arithmetic on the same int8 weights (relative Frobenius norm; the inputs have
outlier channels, as a transformer's do):

- `lowbit panels`: ``lowbit_cpu::int8_linear``, full 8-bit symmetric codes per token, lowbit's
  own GEMM (the path W8A8 layers take on CPUs without VNNI, or under LOWBIT_KERNEL_ISA=avx2);
- `lowbit mm`: ``lowbit_cpu::int8_linear_mm``, the same codes and sums through oneDNN's int8
  matmul (``torch._int_mm``), or lowbit's VNNI GEMV for up to 4 rows (the path W8A8 layers take
  where oneDNN's product is exact: AVX-512 VNNI, AVX-VNNI or AMX; absent elsewhere);
- `fbgemm`: torch's dynamic int8 linear on row-normalised inputs, with 7-bit activation codes
  on CPUs without AVX-512 VNNI (where 8-bit ones saturate) and 8-bit with it (what lowbit ran
  on VNNI CPUs before its ``mm`` path). fbgemm picks its instruction set itself: the
  environment variables that hold torch and oneDNN to AVX2 do not hold it.

To time an AVX-VNNI CPU without AVX-512 (Intel's client CPUs, AMD Zen 5) on one that has both:
``LOWBIT_KERNEL_ISA=avxvnni ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2_VNNI
MKL_ENABLE_INSTRUCTIONS=AVX2``; one without any VNNI: ``LOWBIT_KERNEL_ISA=avx2`` (and
``ONEDNN_MAX_CPU_ISA=AVX2``).

    .venv/bin/python benchmarks/int8_gemm.py [--rows 1 16 128 512] [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from lowbit.kernels import int8
from lowbit.kernels.build import native_ops

SHAPES = {  # (out, in)
    "smollm2-135m q/o (576x576)": (576, 576),
    "smollm2-135m gate/up (1536x576)": (1536, 576),
    "smollm2-135m down (576x1536)": (576, 1536),
    "1.1B gate/up (5632x2048)": (5632, 2048),
    "1.1B down (2048x5632)": (2048, 5632),
}


def fbgemm_linear(codes: torch.Tensor, scale: torch.Tensor):
    """torch's dynamic int8 linear with the activation grid it can run here."""
    torch.backends.quantized.engine = (
        "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zeros = torch.zeros(codes.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    reduce_range = not int8.has_avx512_vnni()

    def run(x: torch.Tensor) -> torch.Tensor:
        amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        return torch.ops.quantized.linear_dynamic(x / amax, packed, reduce_range) * amax

    return run


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if not native_ops():
        print("lowbit's CPU kernels are not built here: nothing to measure", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    vnni, mm = int8.has_avx512_vnni(), int8.onednn_int8_exact()
    codes_bits = "8" if vnni else "7"
    avx_vnni = "avx_vnni" in int8.cpu_flags()
    print(f"torch {torch.__version__}, {args.threads} threads, AVX-512 VNNI: {vnni}, AVX-VNNI: "
          f"{avx_vnni}; "
          f"oneDNN int8 exact: {mm}; fbgemm activation codes: {codes_bits}-bit; median of "
          f"{args.reps} rounds\n")  # fmt: skip
    kernels = ["panels", "mm", "fbgemm"] if mm else ["panels", "fbgemm"]
    print("| layer | rows | float32 ms | " + " | ".join(f"{c} ms | × fp32 | err" for c in kernels)
          + " |")  # fmt: skip
    print("|---|---:|---:|" + "---:|---:|---:|" * len(kernels))
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
        w = codes.float() * scale.unsqueeze(1)
        ours = int8.Int8Weight(None, scale, k, int8.pack_panels(codes))
        candidates = {
            "float": lambda x, w=w: F.linear(x, w),
            "panels": lambda x, o=ours: torch.ops.lowbit_cpu.int8_linear(x, o.panels, o.scale),
            "mm": lambda x, c=codes, s=scale: torch.ops.lowbit_cpu.int8_linear_mm(x, c, s),
            "fbgemm": fbgemm_linear(codes, scale),
        }
        candidates = {c: f for c, f in candidates.items() if c == "float" or c in kernels}
        for m in args.rows:
            x = torch.randn(m, k, generator=gen) * (1 + 20 * (torch.rand(k, generator=gen) > 0.99))
            exact = F.linear(x, w)
            err = {c: float((f(x) - exact).norm() / exact.norm()) for c, f in candidates.items()}
            times: dict[str, list[float]] = {c: [] for c in candidates}
            for _ in range(args.reps):
                for c, f in candidates.items():
                    times[c].append(timed(f, x))
            med = {c: statistics.median(t) for c, t in times.items()}
            cells = [f"{med['float'] * 1e3:.3f}"]
            for c in kernels:
                cells += [f"{med[c] * 1e3:.3f}", f"{med['float'] / med[c]:.2f}", f"{err[c]:.4f}"]
            print(f"| {name} | {m} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel calibration: the same GPTQ run on 1 and on N processes, side by side.

Each row is one `lowbit quantize` job started afresh: one process (`--threads 1`), then
`torchrun --nproc-per-node N` (one thread per process, torchrun's default). Both outputs are then
evaluated on the same held-out windows against the float model, and their weights compared
byte for byte. Calibration (bbc) and evaluation (wiki) text never overlap.

    python benchmarks/distributed.py                       # GPTQ W4 g64, 128 x 512 tokens, N = 2
    python benchmarks/distributed.py --recipe w4-awq-g64 --processes 2 --samples 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open


def quantize(args: argparse.Namespace, out: Path, processes: int) -> dict:
    body = ["-q", "--threads", "1", "quantize", args.model, "--recipe", args.recipe,
            "--out", str(out), "--calib", "bbc", "--calib-samples", str(args.samples),
            "--calib-seqlen", str(args.seqlen)]  # fmt: skip
    if processes == 1:
        cmd = [sys.executable, "-m", "lowbit", *body]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(processes), "-m", "lowbit", *body]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    manifest = json.loads((out / "lowbit.json").read_text())
    return {"wall": wall, "rss": manifest["processes"]["peak_rss_mb"]}


def evaluate(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowbit", "-q", "eval", str(out), "--ref", args.model,
           "--corpus", "wiki", "--seqlen", "512", "--tokens", str(args.eval_tokens),
           "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def codes_differ(a: Path, b: Path) -> tuple[int, int]:
    """(tensors that differ, largest absolute difference of their integer values)."""
    differ = largest = 0
    with (
        safe_open(a / "model.safetensors", "pt") as fa,
        safe_open(b / "model.safetensors", "pt") as fb,
    ):
        for name in fa.keys():  # noqa: SIM118 - safe_open has no iteration
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.shape != y.shape or not bool((x == y).all()):
                differ += 1
                if x.shape == y.shape and not x.is_floating_point():
                    largest = max(largest, int((x.int() - y.int()).abs().max()))
    return differ, largest


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4-gptq-g64")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outs = {n: Path(tmp) / f"p{n}" for n in (1, args.processes)}
        runs = {n: quantize(args, out, n) for n, out in outs.items()}
        evals = {n: evaluate(args, out) for n, out in outs.items()}
        differ, largest = codes_differ(outs[1], outs[args.processes])
    base = runs[1]["wall"]
    print(f"{args.model}, {args.recipe}, calibration bbc {args.samples} x {args.seqlen} "
          f"tokens; eval wiki {args.eval_tokens} tokens in windows of 512 against the float "
          f"model")  # fmt: skip
    print("\n| processes | wall s | speedup | peak RSS per rank (MB) | ppl | KL | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for n, run in runs.items():
        e = evals[n]
        rss = " / ".join(f"{r:,.0f}" for r in run["rss"])
        print(f"| {n} | {run['wall']:.1f} | {base / run['wall']:.2f}x | {rss} | {e['ppl']:.4f} | "
              f"{e['kl']:.5f} | {e['top1']:.4f} |")  # fmt: skip
    print(
        f"\nweights: {'identical' if not differ else f'{differ} tensors differ'}"
        + (f" (largest code change {largest})" if differ else "")
        + f"; ppl {'equal' if evals[1]['ppl'] == evals[args.processes]['ppl'] else 'differs'}"
    )


if __name__ == "__main__":
    main()

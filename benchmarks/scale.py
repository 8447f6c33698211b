"""Streaming quantization at scale: peak RSS and wall time against model size, and the dry run's
estimate beside each measurement.

Each row is one `lowbit quantize` child process (so its peak RSS is its own), preceded by
`lowbit quantize --dry-run --json` for the estimate. The random models are written once into the
cache (seeded weights of the real shapes: their memory and time are real, their text is not).

    python benchmarks/scale.py                                  # every row below
    python benchmarks/scale.py --rows 8b-rtn 3b-gptq            # some of them
    python benchmarks/scale.py --resume                         # kill -9 a GPTQ run 3 times
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {  # name: (model, recipe, calibration windows x tokens or None)
    "135m-rtn": ("smollm2-135m", "w4-rtn-g64", None),
    "135m-gptq": ("smollm2-135m", "w4-gptq-g64", (16, 512)),
    "1b-rtn": ("llama-3.2-1b-random", "w4-rtn-g64", None),
    "3b-rtn": ("llama-3.2-3b-random", "w4-rtn-g64", None),
    "3b-gptq": ("llama-3.2-3b-random", "w4-gptq-g64", (16, 512)),
    "8b-rtn": ("llama-3-8b-random", "w4-rtn-g64", None),
    "7b-moe-rtn": ("olmoe-1b-7b-random", "w4-rtn-g64", None),
}


def lowbit(*args: str, check: bool = True) -> dict:
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def calib_args(calib) -> list[str]:
    if calib is None:
        return []
    n, t = calib
    return ["--calib", "bbc", "--calib-samples", str(n), "--calib-seqlen", str(t)]


def row(name: str, out: Path) -> list:
    from lowbit.models.load import source_folder
    from lowbit.models.source import TensorSource

    model, recipe, calib = ROWS[name]
    folder, _ = source_folder(model)  # writes a random model's folder once, not timed
    src = TensorSource(folder)
    dtypes = ",".join(sorted({e.dtype for e in src.entries.values()}))
    extra = calib_args(calib)
    plan = lowbit("quantize", model, "--recipe", recipe, "--out", str(out), "--dry-run", *extra)
    start = time.perf_counter()
    got = lowbit("quantize", model, "--recipe", recipe, "--out", str(out), "--overwrite", *extra)
    wall = time.perf_counter() - start
    files = [p for p in out.glob("model*.safetensors")]
    output = sum(p.stat().st_size for p in files)
    bench = lowbit("bench", str(out), "--prompt-tokens", "32", "--new-tokens", "16",
                   "--repeats", "1", "--no-rss")  # the output loads and decodes  # fmt: skip
    decode = bench.get("decode_tps")
    params = sum(e.numel for e in src.entries.values())
    block = sum(e.numel for n, e in src.entries.items() if ".layers.0." in n) * 4 / 2**20
    return [name, model, f"{params / 1e9:.2f}B", dtypes, f"{src.nbytes / 1e9:.1f}",
            f"{block:.0f}", recipe,
            f"{wall:.0f}", f"{plan['seconds']:.0f}", f"{got['peak_rss_mb']:.0f}",
            f"{plan['peak_rss_mb']:.0f}", f"{output / 1e9:.2f}",
            f"{plan['output_bytes'] / 1e9:.2f}", f"{decode:.2f}" if decode else "?"]  # fmt: skip


def resume_demo(model: str, recipe: str, calib, work: Path) -> None:
    """GPTQ killed with SIGKILL at three points, resumed each time; the result must equal an
    uninterrupted run byte for byte."""
    extra = calib_args(calib)
    whole = work / "whole"
    lowbit("quantize", model, "--recipe", recipe, "--out", str(whole), "--overwrite", *extra)
    again = work / "again"
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", model, "--recipe", recipe,
           "--out", str(again), *extra]  # fmt: skip
    units = work / ".again.lowbit-work" / "units"
    for target in (2, 12, 24):  # SIGKILL once this many blocks are finished
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while child.poll() is None and len(list(units.glob("*.json"))) < target:
            time.sleep(0.2)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            print(f"killed with {len(list(units.glob('*.json')))} blocks finished")
    subprocess.run(cmd, check=True)
    same = all(filecmp.cmp(p, again / p.name, shallow=False) for p in whole.glob("model*"))
    print(f"resumed result equals the uninterrupted one byte for byte: {same}")


def main() -> None:
    from lowbit.eval.table import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument("--resume", action="store_true", help="the kill -9 / resume demo only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        if args.resume:
            resume_demo("smollm2-135m", "w4-gptq-g64", (16, 512), Path(tmp))
            return
        rows = []
        for name in args.rows:
            rows.append(row(name, Path(tmp) / name))
            print(" | ".join(rows[-1]), flush=True)
            for p in (Path(tmp) / name).glob("*"):
                p.unlink()
    print(format_table(["row", "model", "params", "source dtype", "source GB",
                        "fp32 block MB", "recipe",
                        "wall s", "est. s", "peak RSS MB", "est. MB", "output GB", "est. GB",
                        "decode tok/s"],
                       rows))  # fmt: skip


if __name__ == "__main__":
    main()

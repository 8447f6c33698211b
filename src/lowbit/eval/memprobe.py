"""Peak memory of one model, measured alone in a fresh process.

``python -m lowbit.eval.memprobe SOURCE`` loads SOURCE as ``lowbit bench`` does (fast kernels on),
runs one short prefill + decode, and prints one JSON object: ``peak_rss_mb`` (this process's peak
resident set size: Python, torch, the model and its activations) and ``weight_bytes``. A separate
process is what makes the figure the model's own when ``lowbit bench`` times several side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import torch


def probe_in_subprocess(source: str, prompt_tokens: int, new_tokens: int) -> dict:
    """Run this module on ``source`` in a child process with this process's thread count."""
    cmd = [sys.executable, "-m", "lowbit.eval.memprobe", source, "--prompt-tokens",
           str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads",
           str(torch.get_num_threads())]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {source} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from lowbit.eval.machine import EnergyMeter
    from lowbit.eval.size import model_size
    from lowbit.eval.speed import random_prompt, timed_run
    from lowbit.models import load_model
    from lowbit.runtime import Runtime
    from lowbit.sysinfo import peak_rss_mb

    p = argparse.ArgumentParser(prog="python -m lowbit.eval.memprobe", description=__doc__)
    p.add_argument("source")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.source).model
    prompt = random_prompt(model.config.vocab_size, args.prompt_tokens)
    timed_run(Runtime(model), prompt, max(args.new_tokens, 2), EnergyMeter("none"))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "weight_bytes": model_size(model).total_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

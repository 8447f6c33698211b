"""Decode speed with a quantized key/value cache: attention over the stored codes against
dequantizing the context every step, and the float cache.

One model (``--model``, float weights unless ``--recipe`` names a weight recipe) under three
caches: float32 (the fused decode attention), 8-bit and 4-bit codes (per token and head, groups
of ``--group`` channels, heads Hadamard-rotated; no key centres, which need calibration and
cost one subtraction). Each quantized cache runs two decode loops on the same stored codes:

- ``dequantize + SDPA``: every step prepares the heads in torch ops, dequantizes the layer's
  filled slots to float32 and calls PyTorch's SDPA (what every decode step did before
  ``decode_attention_codes``; prompts still take this path);
- ``attention on codes``: ``lowbit.kernels.kv_attention.decode_attention_codes``, one call per
  layer that prepares the heads, stores the new codes and attends over the stored codes
  without a float copy of the context (what ``lowbit generate`` runs).

Protocol: random prompt of each ``--prompt-tokens`` length, ``--new-tokens`` greedy tokens at
batch 1, one warm-up and ``--repeats`` alternating runs of every loop, medians. "cache bytes" is
the cache's bytes per token of context relative to the float32 cache (codes and float16
scales/minimums). "same tokens" is whether a loop's greedy tokens equal the other loop's on the
same cache (they should: the same codes, attention in another order of summation).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kv_decode.py [--model smollm2-135m]
        [--recipe RECIPE] [--prompt-tokens 512 1920] [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

from lowbit import api
from lowbit.eval import format_table
from lowbit.eval.machine import EnergyMeter, thread_settings
from lowbit.eval.speed import random_prompt, timed_run
from lowbit.formats.spec import AttentionSpec
from lowbit.kernels.build import native_ops
from lowbit.nn.attention import install_attention
from lowbit.runtime import Runtime


class Dequantizing:
    """The compact forward whose decode steps take the prompt path: the layer's filled slots
    dequantized to float32, then SDPA."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def new_cache(self, batch: int, capacity: int):
        return self.forward.new_cache(batch, capacity)

    def __call__(self, ids, cache, all_logits=False):
        if ids.shape[1] == 1 and not all_logits:
            return self.forward(ids, cache, all_logits=True)[:, -1]
        return self.forward(ids, cache, all_logits)


def loops_for(model, spec: AttentionSpec | None, capacity: int) -> dict[str, Runtime]:
    if spec is None:
        return {"fused float attention": Runtime(model)}
    model = copy.deepcopy(model)
    install_attention(model, spec)
    slow = Runtime(model)
    slow._forwards["compact"] = Dequantizing(slow.forward_for(capacity))
    return {"dequantize + SDPA": slow, "attention on codes": Runtime(model)}


def measure(loops: dict[str, Runtime], prompt: torch.Tensor, args) -> dict[str, dict]:
    tokens = {n: loop.generate(prompt.tolist(), args.new_tokens).tokens[0] for n, loop in
              loops.items()}  # fmt: skip  # warm-up
    runs: dict[str, list] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            runs[name].append(timed_run(loop, prompt, args.new_tokens, EnergyMeter("none")))
    return {name: {"decode": (args.new_tokens - 1) / statistics.median(r.decode_s for r in rs),
                   "bytes": rs[0].kv_bytes_per_token, "tokens": tokens[name]}
            for name, rs in runs.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", help="a weight recipe (default: float weights)")
    p.add_argument("--group", type=int, default=32, help="cache channels per scale")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 1920])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = api.load_model(args.model).model
    if args.recipe:
        api.quantize(model, args.recipe, progress=False)
    caches = {"float32": None}
    for bits in (8, 4):
        caches[f"{bits}-bit"] = AttentionSpec(kv_bits=bits, group_size=args.group, hadamard=True)
    rows = []
    for length in args.prompt_tokens:
        prompt = random_prompt(model.config.vocab_size, length)
        capacity = length + args.new_tokens
        base = None
        for cache, spec in caches.items():
            result = measure(loops_for(model, spec, capacity), prompt, args)
            float_bytes = base["bytes"] if base else result["fused float attention"]["bytes"]
            tokens = [r["tokens"] for r in result.values()]
            for name, r in result.items():
                base = base or r
                rows.append([capacity, cache, name, round(r["decode"], 2),
                             f"x{r['decode'] / base['decode']:.2f}",
                             f"{r['bytes'] / float_bytes:.3f}",
                             "-" if len(tokens) == 1 else str(tokens[0] == tokens[1])])  # fmt: skip
    threads = thread_settings()
    isa = torch.ops.lowbit_cpu.kernel_isa() if native_ops() else "reference"
    print(f"\n{args.model} ({args.recipe or 'float weights'}): random prompts, "
          f"{args.new_tokens} new tokens (greedy, batch 1), {args.repeats} alternating runs, "
          f"medians; {threads['torch_threads']} threads ({threads['cpu_capability']}, kernels "
          f"{isa}, OMP_WAIT_POLICY={threads['omp_wait_policy']})\n")  # fmt: skip
    header = ["context", "cache", "decode attention", "decode tok/s", "x float cache",
              "cache bytes", "same tokens"]  # fmt: skip
    print(format_table(header, rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

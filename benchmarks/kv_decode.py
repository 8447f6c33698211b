"""Decode speed with a quantized key/value cache: attention over the stored codes against
dequantizing the context every step, and the float cache.

One model (``--model``, float weights unless ``--recipe`` names a weight recipe) under three
caches: float32 (the fused decode attention), 8-bit and 4-bit codes (per token and head, groups
of ``--group`` channels, heads Hadamard-rotated; no key centres, which need calibration and
cost one subtraction). Each quantized cache runs two decode loops on the same stored codes:

- ``dequantize + SDPA``: every step prepares the heads in torch ops, dequantizes the layer's
  filled slots to float32 and calls PyTorch's SDPA (what every decode step did before
  ``decode_attention_codes``; prompts still take this path);
- ``codes, per-op loop``: ``lowbit.kernels.kv_attention.decode_attention_codes``, one call per
  layer that prepares the heads, stores the new codes and attends over the stored codes
  without a float copy of the context, between the layers' other ops called one by one from
  Python;
- ``attention on codes``: the same ops in one native call per decode step
  (``lowbit_cpu::decode_step``, what ``lowbit generate`` runs).

Protocol: random prompt of each ``--prompt-tokens`` length, ``--new-tokens`` greedy tokens at
batch 1, one warm-up and ``--repeats`` alternating runs of every loop, medians. "cache bytes" is
the cache's bytes per token of context relative to the float32 cache (codes and float16
scales/minimums). "same tokens" is whether the loops' greedy tokens on the same cache are equal
(they should: the same codes, attention in another order of summation).

With ``--op``: the attention op alone, one layer of the model's shape at each context
(``--contexts``), random cache contents, each called through its Python wrapper as the decode
loop calls it: the fused float op (``decode_attention``) against ``decode_attention_codes`` at
8 and 4 bits (keys centred and heads Hadamard-turned, as the
``kv4`` preset stores them), µs per call, median of 7 rounds of 50 calls.

    .venv/bin/python benchmarks/kv_decode.py [--model smollm2-135m]
        [--recipe RECIPE] [--prompt-tokens 512 1920] [--new-tokens 128] [--repeats 3]
        [--no-dequantize]
    .venv/bin/python benchmarks/kv_decode.py --op [--contexts 512 2048 8192]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys

import torch

from lowbit import api
from lowbit.eval import format_table
from lowbit.eval.machine import EnergyMeter, thread_settings
from lowbit.eval.speed import random_prompt, timed_run
from lowbit.formats.spec import AttentionSpec
from lowbit.kernels.build import native_ops
from lowbit.models.kernels import use_kernels
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


def loops_for(model, spec: AttentionSpec | None, capacity: int,
              dequantize: bool = True) -> dict[str, Runtime]:  # fmt: skip
    if spec is None:
        return {"fused float attention": Runtime(model)}
    model = copy.deepcopy(model)
    install_attention(model, spec)
    loops = {}
    if dequantize:
        slow = loops["dequantize + SDPA"] = Runtime(model)
        slow._forwards["compact"] = Dequantizing(slow.forward_for(capacity))
    looped = loops["codes, per-op loop"] = Runtime(model)
    looped.forward_for(capacity).__dict__["_step"] = None  # the cached property: no one call
    loops["attention on codes"] = Runtime(model)
    return loops


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


def op_table(config, contexts: list[int]) -> list[list]:
    """µs per call of one layer's decode attention, float cache against codes."""
    import time

    from lowbit.kernels.decode import decode_attention
    from lowbit.kernels.kv_attention import decode_attention_codes
    from lowbit.primitives.hadamard import hadamard
    from lowbit.primitives.kv import encode_heads

    heads, kv = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    g, empty, rows = torch.Generator().manual_seed(0), torch.empty(0), []
    for n in contexts:
        k, v = (torch.randn(1, kv, n, dim, generator=g) for _ in range(2))
        qkv = torch.randn(1, (heads + 2 * kv) * dim, generator=g)
        ang = torch.arange(n).unsqueeze(1) * torch.linspace(0.01, 1, dim).unsqueeze(0)
        cos, sin, pad, rest = ang.cos(), ang.sin(), torch.zeros(1, dtype=torch.long), (n - 1,)
        calls = {"float32 cache": functools.partial(
            decode_attention, qkv, k, v, cos, sin, pad, *rest, heads, kv, dim**-0.5, empty,
            empty, 1e-6)}  # fmt: skip
        turn, center = hadamard(dim, torch.float32), torch.randn(kv, dim, generator=g)
        for bits in (8, 4):
            stored = [t for x in (k, v) for t in encode_heads(x, bits, 32)]
            calls[f"{bits}-bit codes"] = functools.partial(
                decode_attention_codes, qkv, *stored, cos, sin, pad, *rest, heads, kv,
                dim**-0.5, empty, empty, 1e-6, center, turn, bits, 0)  # fmt: skip
        times = {}
        for name, call in calls.items():
            call()
            rounds = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(50):
                    call()
                rounds.append((time.perf_counter() - start) / 50 * 1e6)
            times[name] = statistics.median(rounds)
        base = times["float32 cache"]
        rows += [[n, name, round(t, 1), f"x{t / base:.2f}"] for name, t in times.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", help="a weight recipe (default: float weights)")
    p.add_argument("--group", type=int, default=32, help="cache channels per scale")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 1920])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-dequantize", action="store_true",
                   help="leave out the dequantize + SDPA loop (the slowest)")  # fmt: skip
    p.add_argument("--op", action="store_true", help="time the attention op alone")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    args = p.parse_args(argv)
    model = api.load_model(args.model).model
    if args.op:
        if not native_ops():
            sys.exit("--op times the native ops: they are not built here")
        threads = thread_settings()
        print(f"\n{args.model}: one layer's decode attention, {threads['torch_threads']} "
              f"threads ({threads['cpu_capability']})\n")  # fmt: skip
        header = ["context", "cache", "us per call", "x float cache"]
        print(format_table(header, op_table(model.config, args.contexts), markdown=True))
        return 0
    if args.recipe:
        api.quantize(model, args.recipe, progress=False)
        use_kernels(model)  # the packed layers' kernels, as a loaded folder runs them
    caches = {"float32": None}
    for bits in (8, 4):
        caches[f"{bits}-bit"] = AttentionSpec(kv_bits=bits, group_size=args.group, hadamard=True)
    rows = []
    for length in args.prompt_tokens:
        prompt = random_prompt(model.config.vocab_size, length)
        capacity = length + args.new_tokens
        base = None
        for cache, spec in caches.items():
            result = measure(loops_for(model, spec, capacity, not args.no_dequantize), prompt,
                             args)  # fmt: skip
            float_bytes = base["bytes"] if base else result["fused float attention"]["bytes"]
            tokens = [r["tokens"] for r in result.values()]
            for name, r in result.items():
                base = base or r
                rows.append([capacity, cache, name, round(r["decode"], 2),
                             f"x{r['decode'] / base['decode']:.2f}",
                             f"{r['bytes'] / float_bytes:.3f}",
                             "-" if len(tokens) == 1 else
                             str(all(t == tokens[0] for t in tokens))])  # fmt: skip
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

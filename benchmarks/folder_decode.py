"""Decode speed of one saved lowbit folder under lowbit's runtimes and llama.cpp, on the same
codes: for models too large to hold in float32 (the other decode benchmarks quantize a float
model in memory), e.g. a mixture of experts quantized by a streamed ``lowbit quantize``.

The folder is exported to GGUF once (or ``--gguf`` names the export) when llama-cpp-python is
installed; then, runs alternating (one warm-up each, medians): lowbit's compact loop (what
``lowbit generate`` and ``bench`` run), lowbit on the model's own transformers forward, and
llama.cpp, each on a random prompt of ``--prompt-tokens`` and greedy decode to
``--new-tokens``. The grids llama.cpp reads exactly: ``w4-sym-g32`` (Q4_0), ``w4-rtn-g32``
(Q4_1), ``w8-sym-g32`` (Q8_0)::

    lowbit quantize olmoe-1b-7b-random --recipe w4-sym-g32 --out out/olmoe-q40
    .venv/bin/python benchmarks/folder_decode.py out/olmoe-q40 [--prompt-tokens 32]
        [--new-tokens 64] [--repeats 3] [--gguf out/olmoe-q40.gguf] [--kv-bits 16]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.eval import format_table
from lowbit.eval.machine import EnergyMeter
from lowbit.eval.speed import random_prompt, timed_run
from lowbit.formats.spec import AttentionSpec
from lowbit.nn.attention import install_attention
from lowbit.runtime import Runtime
from torchao_compare import llama_cpp_run  # (this folder: run as a script)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folder")
    p.add_argument("--gguf", default=None, help="the folder's GGUF export (else written once)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-bits", type=int, default=None,
                   help="lowbit's rows with the cache rounded as `lowbit generate --kv-bits N` "
                        "does (16: float16, as llama.cpp keeps it by default)")  # fmt: skip
    args = p.parse_args()
    try:  # checked before the (large) folder loads
        cache = None if args.kv_bits is None else AttentionSpec(kv_bits=args.kv_bits)
    except LowbitError as exc:
        p.error(str(exc))
    model = api.load(args.folder).model
    if cache is not None:
        install_attention(model, cache)
    prompt = random_prompt(model.config.vocab_size, args.prompt_tokens)
    runs = {"lowbit compact": Runtime(model), "lowbit transformers": Runtime(model, False)}
    try:
        from llama_cpp import Llama, llama_print_system_info
    except ImportError:
        Llama = None
        print("llama.cpp: llama-cpp-python is not installed; its row is skipped")
    if Llama is not None:
        gguf = Path(args.gguf or f"{args.folder.rstrip('/')}.gguf")
        if not gguf.exists():
            from lowbit.export import export

            export(args.folder, "gguf", gguf)
        n_ctx = args.prompt_tokens + args.new_tokens + 8
        runs["llama.cpp"] = Llama(str(gguf), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                                  verbose=False)  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    meter = EnergyMeter("cpu")
    for repeat in range(args.repeats + 1):  # the first round warms up, untimed
        for name, run in runs.items():
            if isinstance(run, Runtime):
                r = timed_run(run, prompt, args.new_tokens, meter)
                got = (r.ttft_s, r.decode_s)
            else:
                got = llama_cpp_run(run, prompt[0].tolist(), args.new_tokens)
            if repeat:
                times[name].append(got)
    rows = []
    for name, got in times.items():
        prefill = args.prompt_tokens / statistics.median(t[0] for t in got)
        decode = (args.new_tokens - 1) / statistics.median(t[1] for t in got)
        rows.append([name, round(prefill, 1), round(decode, 2)])
    base = rows[0][2]
    for row in rows:
        row.append(round(row[2] / base, 2))
    system = llama_print_system_info().decode().strip() if Llama is not None else "-"
    cached = "float32" if args.kv_bits is None else f"--kv-bits {args.kv_bits}"
    print(f"\n{args.folder}: prompt {args.prompt_tokens} random tokens, {args.new_tokens} new "
          f"tokens, {args.repeats} alternating runs, medians; {torch.get_num_threads()} "
          f"threads; lowbit's cache {cached}; llama.cpp: {system}\n")  # fmt: skip
    print(format_table(["runtime", "prefill tok/s", "decode tok/s", "decode / compact"], rows,
                       markdown=True))  # fmt: skip


if __name__ == "__main__":
    main()

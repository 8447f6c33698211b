"""lowbit's kernels against torchao's CPU paths (and llama.cpp when installed), in one run.

For each format, the float model is quantized by lowbit (saved and loaded back on its kernels,
as a user runs it) and by torchao's ``quantize_`` with the matching config; then every model
is timed side by side with ``lowbit bench``'s protocol (random prompt, greedy decode at batch 1,
alternating runs, medians). A torchao path that does not run on this machine is reported with
its error instead of a figure.

With ``--llama-cpp`` and ``llama-cpp-python`` installed, llama.cpp runs on the same codes: for
each grid that GGUF holds exactly (Q4_0 = ``w4-sym-g32``, Q4_1 = ``w4-rtn-g32``) the model is
quantized by lowbit, exported to GGUF, and llama.cpp and lowbit are timed on it, runs
alternating. Build llama.cpp for this CPU (minutes, never in CI); a prebuilt wheel may lack
the CPU's widest instructions, which the table's header shows:

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install --no-cache-dir --no-binary \
        llama-cpp-python llama-cpp-python

    .venv/bin/pip install torchao
    .venv/bin/python benchmarks/torchao_compare.py \\
        [--model tinyllama-1.1b-random] [--prompt-tokens 512] [--new-tokens 128] [--repeats 3]
        [--llama-cpp] [--no-torchao]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lowbit import api
from lowbit.eval import format_table
from lowbit.eval.machine import EnergyMeter
from lowbit.eval.speed import measure_speed, random_prompt, timed_run
from lowbit.runtime import Runtime

log = logging.getLogger("torchao_compare")


def torchao_configs() -> dict[str, tuple[str, object]]:
    """format -> (lowbit recipe, torchao config factory); import errors propagate."""
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    return {
        "W8A16": ("w8-rtn", lambda: tq.Int8WeightOnlyConfig()),
        "W8A8": ("w8a8-dynamic", lambda: tq.Int8DynamicActivationInt8WeightConfig()),
        "W4A16 g64": ("w4-rtn-g64", lambda: tq.Int4WeightOnlyConfig(group_size=64)),
        "W4A16 g64 (intx)": (
            "w4-rtn-g64",
            lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
        ),
    }


def torchao_model(model: torch.nn.Module, factory) -> tuple[torch.nn.Module | None, str]:
    from torchao.quantization import quantize_

    q = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(q, factory())
            with torch.inference_mode():
                q(random_prompt(model.config.vocab_size, 4))
    except Exception as exc:  # report any torchao failure as a row, not a crash
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:90]
    return q, ""


def llama_cpp_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """One run on a llama.cpp model, same protocol as ``timed_run``: (prefill s, decode s)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([llm.sample(temp=0.0)])
    return first - start, time.perf_counter() - first


def placeholder_vocabulary(folder: Path, size: int) -> None:
    """A GPT-2-style tokenizer.json of ``size`` tokens for a model that has none (the random
    speed model): llama.cpp will not load a GGUF without a vocabulary (merges included), and
    this benchmark feeds it token ids, so the strings are never used."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"a": 0, "b": 1, "ab": 2, **{f"t{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="tinyllama-1.1b-random")
    p.add_argument("--formats", nargs="+", default=None, help="subset of the formats")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torchao", action="store_true", help="skip the torchao rows")
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also time llama.cpp on lowbit's Q4_0/Q4_1-grid models exported to GGUF",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.no_torchao:
        _torchao_rows(args)
    if args.llama_cpp:
        _llama_cpp_rows(args)


def _torchao_rows(args: argparse.Namespace) -> None:
    try:
        configs = torchao_configs()
    except ImportError as exc:
        sys.exit(f"torchao is not installed ({exc}); `.venv/bin/pip install torchao` first")
    if args.formats:
        configs = {k: v for k, v in configs.items() if k in args.formats}
    src = api.load_model(args.model)
    models, failures, pairs = {"fp32": src.model}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, (recipe, factory) in configs.items():
            name = f"lowbit {recipe}"
            if name not in models:
                q = copy.deepcopy(src.model)
                report = api.quantize(q, recipe, progress=False)
                folder = api.save(q, Path(tmp) / recipe, report, source=src)
                del q
                models[name] = api.load(folder).model
            tq, why = torchao_model(src.model, factory)
            if tq is None:
                failures[fmt] = why
            else:
                models[f"torchao {fmt}"] = tq
            pairs.append((fmt, name, f"torchao {fmt}"))
        speed = measure_speed(models, args.prompt_tokens, args.new_tokens, args.repeats)
    fp = speed["fp32"]
    print(
        f"\nmodel {args.model}; prompt {args.prompt_tokens} random tokens, {args.new_tokens} new "
        f"tokens, {args.repeats} alternating runs, medians; {torch.get_num_threads()} threads\n"
    )
    rows = []
    for fmt, ours, theirs in pairs:
        a, b = speed[ours], speed.get(theirs)
        rows.append([fmt, ours, round(a.decode_tps, 2), round(a.prefill_tps, 1),
                     None if b is None else round(b.decode_tps, 2),
                     None if b is None else round(b.prefill_tps, 1),
                     None if b is None else round(a.decode_tps / b.decode_tps, 2),
                     None if b is None else round(a.prefill_tps / b.prefill_tps, 2),
                     failures.get(fmt, "")])  # fmt: skip
    header = ["format", "lowbit recipe", "lowbit decode", "lowbit prefill", "torchao decode",
              "torchao prefill", "decode ratio", "prefill ratio", "torchao error"]  # fmt: skip
    print(f"fp32: decode {fp.decode_tps:.2f} tok/s, prefill {fp.prefill_tps:.1f} tok/s\n")
    print(format_table(header, rows, markdown=True))


LLAMA_CPP_FORMATS = {"Q4_0": "w4-sym-g32", "Q4_1": "w4-rtn-g32"}  # GGUF type -> same grid


def _llama_cpp_rows(args: argparse.Namespace) -> None:
    """llama.cpp against lowbit on the same codes: each grid GGUF holds exactly is quantized by
    lowbit, exported to GGUF, and both runtimes are timed on it, runs alternating."""
    try:
        from llama_cpp import Llama, llama_print_system_info
    except ImportError:
        print("\nllama.cpp: llama-cpp-python is not installed; skipped")
        return
    from lowbit.export import export

    src = api.load_model(args.model)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type, recipe in LLAMA_CPP_FORMATS.items():
            q = copy.deepcopy(src.model)
            report = api.quantize(q, recipe, progress=False)
            folder = api.save(q, Path(tmp) / recipe, report, source=src)
            del q
            if src.tokenizer is None:
                placeholder_vocabulary(folder, src.model.config.vocab_size)
            gguf = export(folder, "gguf", Path(tmp) / f"{recipe}.gguf").path
            ours = api.load(folder).model
            n_ctx = args.prompt_tokens + args.new_tokens + 8
            llm = Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, verbose=False)
            prompt = random_prompt(src.model.config.vocab_size, args.prompt_tokens)
            times: dict[str, list[tuple[float, float]]] = {"llama.cpp": [], "lowbit": []}
            ours = Runtime(ours)
            timed_run(ours, prompt[:, :16], 4, EnergyMeter("cpu"))  # warm-up, as bench does
            llama_cpp_run(llm, prompt[0, :16].tolist(), 4)
            for _ in range(args.repeats):
                times["llama.cpp"].append(llama_cpp_run(llm, prompt[0].tolist(), args.new_tokens))
                run = timed_run(ours, prompt, args.new_tokens, EnergyMeter("cpu"))
                times["lowbit"].append((run.ttft_s, run.decode_s))
            del llm, ours
            tps = {
                name: (args.prompt_tokens / statistics.median(t[0] for t in runs),
                       (args.new_tokens - 1) / statistics.median(t[1] for t in runs))
                for name, runs in times.items()
            }  # fmt: skip
            (lp, ld), (cp, cd) = tps["lowbit"], tps["llama.cpp"]
            rows.append([gguf_type, recipe, round(ld, 2), round(lp, 1), round(cd, 2),
                         round(cp, 1), round(ld / cd, 2), round(lp / cp, 2)])  # fmt: skip
    header = ["GGUF type", "lowbit recipe", "lowbit decode", "lowbit prefill", "llama.cpp decode",
              "llama.cpp prefill", "decode ratio", "prefill ratio"]  # fmt: skip
    system = llama_print_system_info().decode().strip()
    print(
        f"\nllama.cpp on the same codes ({args.model}; lowbit folder exported to GGUF; "
        f"{args.repeats} alternating runs, medians; {threads} threads; llama.cpp: {system})\n"
    )
    print(format_table(header, rows, markdown=True))


if __name__ == "__main__":
    main()

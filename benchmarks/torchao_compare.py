"""lowbit's kernels against torchao's CPU paths (and llama.cpp when installed), in one run.

For each format, the float model is quantized by lowbit (saved and loaded back on its kernels,
as a user runs it) and by torchao's ``quantize_`` with the matching config; then every model
is timed side by side with ``lowbit bench``'s protocol (random prompt, greedy decode at batch 1,
alternating runs, medians). A torchao path that does not run on this machine is reported with
its error instead of a figure. With ``--llama-cpp`` and ``llama-cpp-python`` installed (it
builds llama.cpp from source: minutes, never in CI), the default model's original GGUF (Q4_1,
the same grid as lowbit's w4-rtn-g32) is timed too.

    .venv/bin/pip install torchao
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/torchao_compare.py \\
        [--model tinyllama-1.1b-random] [--prompt-tokens 512] [--new-tokens 128] [--repeats 3]
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
from lowbit.eval.speed import measure_speed, random_prompt

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


def llama_cpp_tps(gguf: Path, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Decode and prefill tokens/s of llama.cpp on a GGUF, same protocol (medians)."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=prompt_tokens + new_tokens + 8, n_threads=torch.get_num_threads(),
                verbose=False)  # fmt: skip
    prompt = random_prompt(llm.n_vocab(), prompt_tokens).tolist()[0]
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        end = time.perf_counter()
        prefill.append(prompt_tokens / (first - start))
        decode.append((new_tokens - 1) / (end - first))
    return {"prefill_tps": statistics.median(prefill), "decode_tps": statistics.median(decode)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="tinyllama-1.1b-random")
    p.add_argument("--formats", nargs="+", default=None, help="subset of the formats")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (smollm2-135m)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
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
    if args.llama_cpp:
        _llama_cpp_row(args)


def _llama_cpp_row(args: argparse.Namespace) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama.cpp: llama-cpp-python is not installed; skipped")
        return
    from lowbit.models.zoo import zoo, zoo_gguf

    gguf = zoo_gguf(zoo()["smollm2-135m"])
    ref = llama_cpp_tps(gguf, args.prompt_tokens, args.new_tokens, args.repeats)
    src = api.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        q = copy.deepcopy(src.model)
        folder = api.save(q, Path(tmp) / "q", api.quantize(q, "w4-rtn-g32", progress=False),
                          source=src)  # fmt: skip
        ours = measure_speed({"lowbit": api.load(folder).model}, args.prompt_tokens,
                             args.new_tokens, args.repeats)["lowbit"]  # fmt: skip
    print(
        f"\nsmollm2-135m, Q4_1 grid: llama.cpp decode {ref['decode_tps']:.1f} tok/s, prefill "
        f"{ref['prefill_tps']:.1f}; lowbit w4-rtn-g32 decode {ours.decode_tps:.1f}, prefill "
        f"{ours.prefill_tps:.1f} (lowbit / llama.cpp: decode "
        f"x{ours.decode_tps / ref['decode_tps']:.2f}, prefill "
        f"x{ours.prefill_tps / ref['prefill_tps']:.2f}; not alternated: run one after the other)"
    )


if __name__ == "__main__":
    main()

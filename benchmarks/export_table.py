"""Exports measured in their consumers: file size, load, and perplexity beside lowbit's own.

For each (format, recipe): quantize the default model, save it, export it, load the export in
the runtime that serves that format, and score both on the same `wiki` windows: perplexity in
lowbit, perplexity in the consumer, and KL(lowbit || consumer) and top-1 agreement (how closely
the consumer reproduces lowbit's distribution). Consumers:

  compressed-tensors  transformers + compressed-tensors (CPU, decompressed on load)
  gguf                llama.cpp through llama-cpp-python (not a lowbit dependency: it builds
                      llama.cpp from source, 10-30 min on 2 cores). On this Xeon (AVX-512, AMX)
                      the default native build crashed in its first decode, on the publisher's
                      own GGUF as well; a portable AVX2 build runs:
                      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                      -DGGML_AVX512=OFF -DGGML_OPENMP=OFF" pip install llama-cpp-python
  onnx                onnxruntime (CPUExecutionProvider)
  litert              the LiteRT interpreter (ai-edge-litert, XNNPACK; `lowbit[litert]`), on the
                      file's `forward` signature; "codes" counts the layers whose codes and
                      scales read back from the .tflite equal lowbit's

    .venv/bin/python benchmarks/export_table.py [--formats gguf onnx compressed-tensors]
        [--tokens 8192]   (litert: its rows export with a KV cache too, 3-4 min each here)

W4 group 32 (asymmetric) is on the default model's original grid: its GGUF row checks that the
export is exact (llama.cpp vs lowbit), not quantization quality.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lowbit import api
from lowbit.export import LiteRTOptions, export
from lowbit.export.litert_codes import read_codes
from lowbit.recipes import Recipe

W8A8 = {"bits": 8, "granularity": "token", "dynamic": True}
BF16 = {"scale_dtype": "bfloat16"}  # LiteRT's CPU runtime computes int4 blocks with bf16 scales
W4_G32_BF16 = BF16 | {"bits": 4, "group_size": 32, "symmetric": True}
A8_ROWS = {"bits": 8, "granularity": "token", "dynamic": True, "symmetric": False}
RECIPES = {
    "compressed-tensors": {
        "w4-sym-g64": ({"bits": 4, "group_size": 64, "symmetric": True}, None),
        "w8-channel": ({"bits": 8, "group_size": -1, "symmetric": True}, None),
        "w8a8-dynamic": ({"bits": 8, "group_size": -1, "symmetric": True}, W8A8),
    },
    "gguf": {
        "w4-g32 (Q4_1)": ({"bits": 4, "group_size": 32}, None),
        "w4-sym-g32 (Q4_0)": ({"bits": 4, "group_size": 32, "symmetric": True}, None),
        "w8-sym-g32 (Q8_0)": ({"bits": 8, "group_size": 32, "symmetric": True}, None),
    },
    "litert": {  # + LiteRT's own input rounding (int8, asymmetric, per row, on the fly)
        "w8-channel + a8": ({"bits": 8, "group_size": -1, "symmetric": True}, A8_ROWS),
        "w4-sym-channel + a8": ({"bits": 4, "group_size": -1, "symmetric": True}, A8_ROWS),
        "w4-sym-g32-bf16 + a8": (W4_G32_BF16, A8_ROWS),
        "w4-gptq-sym-g64-bf16 + a8 (GPTQ)": (
            BF16 | {"bits": 4, "group_size": 64, "symmetric": True},
            A8_ROWS,
            "gptq",
        ),
        "w4-sym-g32-bf16 (weights only)": (W4_G32_BF16, None),
    },
    "onnx": {
        "w4-g64": ({"bits": 4, "group_size": 64}, None),
        "w8-channel": ({"bits": 8, "group_size": -1, "symmetric": True}, None),
        "w8a8-dynamic": ({"bits": 8, "group_size": -1, "symmetric": True}, W8A8),
    },
}


class OrtModel(nn.Module):
    """An onnxruntime session behind the model(input_ids) -> logits interface."""

    def __init__(self, folder: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), opts,
                                         providers=["CPUExecutionProvider"])  # fmt: skip

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = self.sess.run(None, {"input_ids": ids.numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


class LlamaCppModel(nn.Module):
    """llama.cpp (llama-cpp-python) scoring the exact token ids it is given."""

    def __init__(self, path: Path, seqlen: int, threads: int) -> None:
        super().__init__()
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=seqlen, n_batch=512, logits_all=True,
                         n_threads=threads, verbose=False)  # fmt: skip

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        scores = self.llm.scores[: ids.shape[1]]
        return SimpleNamespace(logits=torch.from_numpy(scores.copy()).unsqueeze(0))


def consumer(fmt: str, path: Path, seqlen: int, threads: int) -> nn.Module:
    if fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if fmt == "onnx":
        return OrtModel(path, threads)
    if fmt == "litert":
        from lowbit.models.litert import LiteRTModel

        return LiteRTModel(path, threads)
    return LlamaCppModel(path, seqlen, threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--only", nargs="+", metavar="RECIPE", help="run only these recipe names")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    src = api.load_model(args.model, kernels=False)
    print(
        f"model {args.model}; evaluation {args.corpus}: first {args.tokens} tokens in windows "
        f"of {args.seqlen}; KL and top-1 of the consumer against lowbit on the same windows\n"
    )
    print(
        "| format | recipe | export bytes | loads | ppl lowbit | ppl consumer | diff | "
        "KL(lowbit‖consumer) | top-1 | export s | codes |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            for name, (weights, acts, *algorithm) in RECIPES[fmt].items():
                if args.only and name not in args.only:
                    continue
                row = run_one(src, fmt, name, weights, acts, algorithm, Path(tmp), args, threads)
                print(row, flush=True)


def run_one(src, fmt, name, weights, acts, algorithm, tmp: Path, args, threads: int) -> str:
    body = {"version": 1, "name": name, "weights": weights, "ignore": ["lm_head"],
            "algorithm": algorithm[0] if algorithm else "rtn"}  # fmt: skip
    if acts:
        body["activations"] = acts
    calib = None
    if algorithm:  # calibration text never overlaps the evaluation corpus
        calib = api.calibration_set(src.tokenizer, "bbc", samples=64, seqlen=512)
    model = copy.deepcopy(src.model)
    report = api.quantize(model, Recipe.from_dict(body), calib, progress=False)
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)  # unique per row
    folder = api.save(model, tmp / f"{fmt}-{slug}", report, source=src)
    del model
    suffix = {"gguf": ".gguf", "litert": ".tflite"}.get(fmt, "-export")
    target = tmp / f"{fmt}-{slug}{suffix}"
    opts = LiteRTOptions(seqlen=args.seqlen, kv_cache=True)
    t0 = time.perf_counter()
    result = export(folder, fmt, target, litert=opts)
    seconds = time.perf_counter() - t0
    ours = api.load(folder).model
    try:
        theirs = consumer(fmt, result.path, args.seqlen, threads)
        loads = "yes"
    except Exception as exc:  # report any consumer failure in the table, then go on
        print(f"{fmt} {name}: the consumer failed to load the export: {exc}", file=sys.stderr)
        return f"| {fmt} | {name} | {result.bytes:,} | **no** | | | | | | {seconds:.1f} | |"
    res = api.evaluate({"lowbit": ours, "consumer": theirs}, src.tokenizer, args.corpus,
                       args.seqlen, args.tokens, ref=ours, progress=False)  # fmt: skip
    a, b = res["lowbit"], res["consumer"]
    return (
        f"| {fmt} | {name} | {result.bytes:,} | {loads} | {a.ppl:.3f} | {b.ppl:.3f} | "
        f"{100 * (b.ppl / a.ppl - 1):+.2f}% | {b.kl:.4f} | {b.top1:.3f} | {seconds:.1f} | "
        f"{codes_read_back(fmt, folder, result.path)} |"
    )


def codes_read_back(fmt: str, folder: Path, path: Path) -> str:
    """LiteRT: how many quantized layers' codes and scales the file holds unchanged."""
    if fmt != "litert":
        return "-"
    from ai_edge_litert.tools import flatbuffer_utils

    from lowbit.export.litert_codes import encode
    from lowbit.nn import QuantLinear

    stored = list(read_codes(flatbuffer_utils.read_model(str(path))).values())
    model = api.load(folder, kernels=False).model  # the packed layers, not the kernels'
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    same = sum(any(e.same(encode(m, n)) for e in stored) for n, m in layers)
    return f"{same}/{len(layers)}"


if __name__ == "__main__":
    main()

"""One peer quantization, run by benchmarks/peers.py inside the peers' venv (.venv-peers).

Reads the calibration windows lowbit drew (a safetensors file holding ``windows``, a LongTensor
[samples, seqlen] of token ids), quantizes the float HF folder ``--model`` with one peer, and
writes the peer's quantized HF folder to ``--out``, and ``--result`` (JSON): the seconds the
peer's quantization took (model loading and saving excluded), the folder's format, the versions.
lowbit is not imported here: this file runs with the peers' own torch/transformers.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import torch
from safetensors.torch import load_file


def weight_only(bits: int, group: int) -> dict:
    """llm-compressor's settings for int weights, asymmetric, groups of ``group``."""
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": group}  # fmt: skip
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def llmcompressor(args: argparse.Namespace, windows: torch.Tensor) -> float:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14 pins AWQ's cached activations for faster host-to-GPU copies;
        # without a GPU, pin_memory() raises, and pinning is only a transfer optimisation
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    settings = weight_only(args.bits, args.group)
    if args.peer == "gptq":
        recipe = [GPTQModifier(**settings, dampening_frac=args.dampening, ignore=["lm_head"])]
    elif args.peer == "awq":
        recipe = [AWQModifier(), QuantizationModifier(**settings, ignore=["lm_head"])]
    else:  # int8 per-channel weights, int8 dynamic per-token activations
        recipe = [QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib = Dataset.from_dict({"input_ids": windows.tolist(),
                               "attention_mask": torch.ones_like(windows).tolist()})  # fmt: skip
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=calib, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)  # fmt: skip
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    return seconds


def autoround(args: argparse.Namespace, windows: torch.Tensor) -> float:
    from auto_round import AutoRound, QuantizationScheme, SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    scheme = QuantizationScheme(bits=args.bits, group_size=args.group, sym=False, act_bits=16)
    # one dict per window: with an explicit all-ones mask, auto-round infers no padding
    calib = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(1)]
    start = time.perf_counter()
    rounder = AutoRound(
        model, tokenizer, scheme=scheme, alg_configs=SignRoundConfig(iters=args.iters),
        dataset=calib, nsamples=len(windows), seqlen=windows.shape[1], batch_size=args.batch,
        device_map=0 if torch.cuda.is_available() else "cpu", enable_torch_compile=args.compile,
    )  # fmt: skip
    rounder.quantize()
    seconds = time.perf_counter() - start
    # "fake": the tuned weights saved dequantized, loadable without auto-round's kernels
    rounder.save_quantized(args.out, format="fake")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("peer", choices=["gptq", "awq", "w8a8", "autoround"])
    p.add_argument("--model", required=True, help="float HF folder")
    p.add_argument("--calib", required=True, help="safetensors file with `windows`")
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True, help="JSON file to write")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args()
    windows = load_file(args.calib)["windows"]
    if args.peer == "autoround":
        seconds, fmt = autoround(args, windows), "fake (dequantized)"
    else:
        seconds, fmt = llmcompressor(args, windows), "compressed-tensors"
    packages = ["torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round"]
    result = {"seconds": seconds, "format": fmt, "versions": {n: version(n) for n in packages}}
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

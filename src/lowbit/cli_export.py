"""``lowbit export``: a lowbit folder to compressed-tensors, GGUF, ONNX or LiteRT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli_args import positive
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

_EPILOG = """\
examples:
  lowbit quantize smollm2-135m --recipe w4-rtn-g32 --out out/w4g32
  lowbit export out/w4g32 --format gguf --out out/w4g32.gguf          # Q4_1, exact
  lowbit quantize smollm2-135m --recipe recipe-w4-sym-g64.yaml --out out/w4s
  lowbit export out/w4s --format compressed-tensors --out out/w4s-ct  # transformers / vLLM
  lowbit export out/w4g64 --format onnx --out out/w4g64-onnx          # ONNX Runtime
  lowbit quantize smollm2-135m --recipe w4-sym-g32-bf16 --out out/w4s32
  lowbit export out/w4s32 --format litert --out out/w4s32.tflite --kv-cache  # phones, edge
  lowbit eval out/w4s32.tflite --seqlen 2048                          # scored in LiteRT

What maps exactly (anything else is an error naming the layer, or for GGUF --requantize):
  compressed-tensors  int2..int8 weights, symmetric or `zero_point: int`, group or channel;
                      W8A8 with per-token dynamic activations (int-quantized)
  gguf                int4 sym g32 -> Q4_0, int4 asym g32 -> Q4_1, int8 sym g32 -> Q8_0
                      (float16 scales); Llama, Mistral, Qwen2, Qwen3 and Phi-3 architectures, and
                      others with Llama's arithmetic (written as llama); the tokenizer from
                      tokenizer.json (GPT-2 BPE, or SentencePiece BPE with byte fallback)
  onnx                int4/int8 weight-only (MatMulNBits, any group size >= 16 that is a power
                      of two); W8A8 through DynamicQuantizeLinear + MatMulInteger
  litert              int8 and int4 symmetric per channel, int4 symmetric groups of 32/64/128
                      (float16 scales); LiteRT quantizes activations to int8 on the fly
                      (dynamic FULLY_CONNECTED, XNNPACK). One .tflite with the tokenizer inside:
                      `forward` (scoring windows of --seqlen), with --kv-cache also `prefill`
                      (chunks of --prefill tokens) and `decode` over a KV cache of --cache slots
                      (Llama, Mistral, Qwen2, Qwen3, Phi-3, and families with Llama's
                      arithmetic). Needs pip install 'lowbit[litert]'.

Image models (a folder of waifu2x-upconv7, dcgan-faces, ...): onnx (QDQ convolutions, W8A8
as QLinearConv-style QDQ pairs) or litert, fixed at the shape of the model's evaluation
input: weight-only folders as int8/int4 per-channel codes (symmetric or `zero_point: int`) each
feeding a DEQUANTIZE before a float convolution; W8A8 folders (conv-w8a8-static/-gptq/-best) as
full integer: int8 tensors between the layers with lowbit's ranges, codes and int32 biases
(convolutions, ReLU / LeakyReLU, residual adds, squeeze-excitation gates, pooling; an
operator LiteRT's quantizer leaves in float is refused).
"""


def add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="write a lowbit folder for a runtime (GGUF, ONNX, ...)",
        description="Export a quantized lowbit folder to the format a runtime loads: "
        "compressed-tensors (transformers, vLLM), GGUF (llama.cpp) or ONNX (ONNX Runtime). "
        "The packed codes and scales are carried over exactly; the output appears only when "
        "it is complete.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("folder", type=Path, metavar="DIR", help="a lowbit output folder")
    p.add_argument("--format", required=True, choices=["compressed-tensors", "gguf", "onnx",
                                                       "litert"])  # fmt: skip
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (GGUF: a .gguf file; LiteRT: a .tflite file)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--float-type", choices=["f16", "f32"], default=None,
        help="GGUF: storage of the layers left in float (default f16, as llama.cpp's converter)",
    )  # fmt: skip
    p.add_argument(
        "--requantize", choices=["q8_0", "q4_0", "q4_1", "f16", "int8", "int4-g32", "float"],
        help="re-quantize layers the format cannot hold exactly (lossy; each one logged): "
        "GGUF q8_0/q4_0/q4_1/f16, LiteRT int8 (per channel)/int4-g32/float",
    )  # fmt: skip
    lite = p.add_argument_group("LiteRT")
    lite.add_argument("--seqlen", type=positive,
                      help="tokens per window of the `forward` signature (2048, or the "
                      "model's context if shorter)")  # fmt: skip
    lite.add_argument("--kv-cache", action="store_true",
                      help="also `prefill` and `decode` signatures over a KV cache")  # fmt: skip
    lite.add_argument("--prefill", type=positive, default=None,
                      help="tokens per prefill call (128; prompts are fed in chunks)")  # fmt: skip
    lite.add_argument("--cache", type=positive,
                      help="KV-cache slots: prompt + new tokens (1024, or the model's "
                      "context if shorter)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.export import LiteRTOptions, export

    choices = {"gguf": ("q8_0", "q4_0", "q4_1", "f16"), "litert": ("int8", "int4-g32", "float")}
    if args.requantize and args.format in choices and args.requantize not in choices[args.format]:
        raise LowbitError(f"--requantize {args.requantize} is not a {args.format} choice; "
                          f"use one of {', '.join(choices[args.format])}")  # fmt: skip
    given = {"--float-type": (args.float_type is not None, "gguf"),
             **{flag: (value, "litert") for flag, value in (
                 ("--seqlen", args.seqlen is not None), ("--kv-cache", args.kv_cache),
                 ("--prefill", args.prefill is not None), ("--cache", args.cache is not None))},
             }  # fmt: skip
    for flag, (set_, only) in given.items():
        if set_ and args.format != only:
            raise LowbitError(f"{flag} is for {only} export, not {args.format}")
    lone = "--prefill" if args.prefill is not None else "--cache" if args.cache else None
    if lone and not args.kv_cache:
        raise LowbitError(f"{lone} sizes the KV-cache signatures: add --kv-cache")
    prefill = args.prefill or min(128, args.cache or 128)  # (a small --cache: chunks fit it)
    opts = LiteRTOptions(args.seqlen, args.kv_cache, prefill, args.cache)
    result = export(args.folder, args.format, args.out, args.overwrite, args.float_type or "f16",
                    args.requantize, litert=opts)  # fmt: skip
    if args.json:
        print(json_text(result.to_dict()))
    else:
        print(f"exported {args.folder} as {result.format} to {result.path} "
              f"({result.bytes / 1e6:.1f} MB)")  # fmt: skip
    return 0

"""``lowbit generate`` and ``lowbit chat``: text from a model, streamed as it is produced."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lowbit.cli_args import (
    add_attention_options,
    apply_attention,
    positive,
    refuse_attention,
    seed,
)
from lowbit.cli_image_generate import add_image_options, generate_images, refuse_image_options
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

_GENERATE_EPILOG = """\
examples:
  lowbit generate smollm2-135m --chat --prompt "Name three uses of a paperclip."
  lowbit generate out/w4 --prompt "The capital of France is" --max-new-tokens 20
  lowbit generate out/w4 --chat --prompt "Write a haiku." --temperature 0.7 --top-p 0.9 --seed 1
  echo "Summarise: ..." | lowbit generate out/w4 --chat --prompt -

  lowbit generate dcgan-faces --count 16 --seed 1 --out faces.png   # a grid of 16 samples
  lowbit generate out/sr8 --image photo.jpg --out photo-2x.png       # a 2x upscale
  lowbit generate out/sr8 --image photos/ --out photos-2x            # a folder, PNG each

Greedy by default (--temperature 0); with -v, prefill and decode tokens/s go to stderr at the
end. Llama, Mistral, Qwen2, Qwen3 and Phi-3 models run on lowbit's compact decode loop (static
KV cache, fused decode ops), and so does another family whose tiny random twin shows Llama's
arithmetic (checked once, logged); other families on the model's own forward.
"""


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive, default=256,
                   help="most tokens to generate (256); generation also ends at the model's "
                   "end-of-sequence token")  # fmt: skip
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; > 0: sample from softmax(logits / T)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (0)")
    p.add_argument("--system", help="a system message before the conversation (generate: "
                   "with --chat)")  # fmt: skip


def add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate", parents=[common], help="generate text from a prompt (streamed), or images",
        description="Generate text from MODEL (a lowbit folder, a zoo name, an HF folder or id) "
        "for one prompt and stream it to stdout as it is produced. With --chat the prompt is "
        "a user message in the tokenizer's chat template. An image model (a zoo name, its "
        "lowbit folder or .tflite) writes PNGs instead: a generator's samples, or a "
        "super-resolution model's 2x upscale of --image.",
        epilog=_GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL|DIR")
    p.add_argument("--prompt", help="the prompt text ('-': read it from stdin); language models")
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template")
    _sampling_options(p)
    add_attention_options(p)
    p.add_argument("--json", action="store_true",
                   help="no streaming: print one JSON object (text, tokens, speeds)")  # fmt: skip
    add_image_options(p)
    p.set_defaults(func=cmd_generate)


def add_chat(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "chat", parents=[common], help="an interactive chat with a model",
        description="Chat with MODEL in the terminal: each line you type is a user message, "
        "the reply streams back; the conversation is kept (oldest turns dropped when it "
        "outgrows the context). /reset forgets it, /exit or Ctrl-D leaves. The model's "
        "tokenizer needs a chat template.",
        epilog="example:\n  lowbit chat out/w4 --system 'Answer briefly.' --temperature 0.7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL|DIR")
    _sampling_options(p)
    add_attention_options(p)
    p.set_defaults(func=cmd_chat)


def _session(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from lowbit import api
    from lowbit.runtime import Runtime, Sampling

    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    src = api.load_model(args.model)
    if src.tokenizer is None:
        raise LowbitError(f"{args.model} has no tokenizer; text generation needs one")
    apply_attention(src.model, args)
    return src, Runtime(src.model), sampling


def _stream(runtime: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace,
            sampling: Any, out: Any) -> Any:  # fmt: skip
    from lowbit.runtime.text import TextStream, stop_ids

    stream = TextStream(tokenizer)

    def show(new: list) -> None:
        if new[0] is not None and out is not None:
            out.write(stream.push(new[0]))
            out.flush()

    run = runtime.generate([ids], args.max_new_tokens, sampling,
                           stop_ids(tokenizer, runtime.model), show)  # fmt: skip
    if out is not None:
        out.write(stream.flush())
    return run


def _stats(run: Any) -> str:
    kv = "" if run.kv_bytes_per_token is None else (
        f", KV cache {run.kv_bytes_per_token / 1024:.1f} KiB per token of context")  # fmt: skip
    return (f"{run.prompt_tokens} prompt tokens, {len(run.tokens[0])} generated ({run.finish[0]}); "
            f"prefill {run.prefill_tps:.1f} tok/s, decode {run.decode_tps:.1f} tok/s "
            f"({run.path} loop{kv})")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from lowbit.cli_image import image_entry
    from lowbit.runtime.text import chat_ids, text_ids

    entry = image_entry(args.model, exported=True)
    if entry is not None:
        refuse_attention(args, args.model)
        return generate_images(args, entry)
    refuse_image_options(args, args.model)
    if args.prompt is None:
        raise LowbitError("give --prompt: the text to continue (or, with --chat, to answer)")
    if args.system is not None and not args.chat:
        raise LowbitError("--system goes with --chat (a system message before the prompt)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise LowbitError("the prompt is empty: give some text with --prompt")
    src, runtime, sampling = _session(args)
    tok = src.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]  # fmt: skip
        ids = chat_ids(tok, messages)
    else:
        ids = text_ids(tok, prompt)
    run = _stream(runtime, tok, ids, args, sampling, None if args.json else sys.stdout)
    if args.json:
        print(json_text({"text": tok.decode(run.tokens[0], skip_special_tokens=True),
                          "tokens": run.tokens[0], "finish": run.finish[0],
                          "prompt_tokens": run.prompt_tokens,
                          "prefill_tps": round(run.prefill_tps, 2),
                          "decode_tps": round(run.decode_tps, 2), "loop": run.path}))  # fmt: skip
        return 0
    print()
    if args.verbose:
        print(_stats(run), file=sys.stderr)
    return 0


def _fit(runtime: Any, tok: Any, messages: list[dict], max_new: int) -> list[int]:
    """The conversation's ids, dropping the oldest exchanges until it fits the context."""
    from lowbit.runtime.text import chat_ids

    limit = runtime.limit or 1 << 30
    while True:
        ids = chat_ids(tok, messages)
        if len(ids) + max_new <= limit:
            return ids
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        if first_user == len(messages) - 1:
            raise LowbitError(f"this message needs {len(ids)} tokens; the context holds "
                              f"{limit} with {max_new} new tokens: shorten it")  # fmt: skip
        del messages[first_user : first_user + 2]  # one user turn and its reply


def cmd_chat(args: argparse.Namespace) -> int:
    src, runtime, sampling = _session(args)
    tok = src.tokenizer
    if not getattr(tok, "chat_template", None):
        raise LowbitError(f"{args.model}'s tokenizer has no chat template; lowbit chat needs "
                          f"one (lowbit generate --prompt continues plain text)")  # fmt: skip
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        try:
            ids = _fit(runtime, tok, messages, args.max_new_tokens)
        except LowbitError as exc:
            messages.pop()
            print(f"lowbit: {exc}", file=sys.stderr)
            continue
        run = _stream(runtime, tok, ids, args, sampling, sys.stdout)
        print()
        messages.append(
            {"role": "assistant", "content": tok.decode(run.tokens[0], skip_special_tokens=True)}
        )
        if args.verbose:
            print(_stats(run), file=sys.stderr)

"""Where decode time goes: the same model and codes under each decode loop, and llama.cpp.

For each recipe (``fp32`` = the float model), the model is quantized by lowbit, saved and loaded
back on its kernels (as a user runs it), then timed with ``lowbit bench``'s protocol (random
prompt, greedy decode at batch 1, medians of alternating runs) under each loop:

- ``transformers``: the model's own forward and cache (what lowbit ran before its runtime);
- ``compact, torch ops``: lowbit's compact forward with the plain-PyTorch decode ops;
- ``compact, fused``: the same with the fused decode ops (``lowbit generate`` / ``bench``);
- ``compact, torch.compile`` (``--compile``): the decode step, over the whole static cache with
  a position tensor (fixed shapes), captured by ``torch.compile`` with the lowbit kernels as
  custom ops with fake implementations; first calls (compilation) are not timed;
- ``llama.cpp`` (``--llama-cpp``, llama-cpp-python installed): for ``w4-sym-g32`` (Q4_0's grid),
  ``w4-rtn-g32`` (Q4_1's), ``w4-sym-g32-head8`` (Q4_0 with the output head in Q8_0, the
  same codes on both sides; llama.cpp's own Q4_0 files quantize the head too, to Q6_K) and
  ``w4-sym-g32-head16`` (Q4_0 with a float16 head, as a Q4_0 file with float16 floats), the
  lowbit folder exported to GGUF and run by llama.cpp, its runs alternating with the others.
  A random-weight model gets a stand-in tokenizer for the GGUF (:func:`stand_in_tokenizer`).
  On a VM that does not enable the CPU's AMX state, a ``GGML_NATIVE=ON`` build crashed
  (SIGSEGV) in its AMX weight buffers: build it with
  ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
  -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF ..."`` instead. A build keeps its instruction set
  (the table's header names it): for the AVX2 run (``LOWBIT_KERNEL_ISA=avx2``) install a
  second build with ``-DGGML_AVX512=OFF`` into a folder (``pip install --no-deps --target DIR``)
  and put that folder first on ``PYTHONPATH``.
- ``LiteRT`` (``--litert``, ``lowbit[litert]`` installed): the lowbit folder exported with
  ``lowbit export --format litert --kv-cache`` and run in the LiteRT interpreter (XNNPACK,
  int8 activations on the fly) through the same decode loop (prefill/decode signatures); for
  recipes LiteRT holds exactly (e.g. ``w4-sym-g32-bf16``, also Q4_0's grid: llama.cpp runs the
  same codes).

Every loop of every recipe runs in one alternation (the speed ratios between recipes, e.g. W4
against float32, are measured side by side), and decode speed is given as a ratio to the
first recipe's transformers loop and to its compact fused one (lowbit's own loop; with
``fp32`` first: lowbit float32). Every loop is compared with the transformers loop on the
same recipe: the fraction of decode
steps whose argmax is the transformers loop's next token when both are fed that loop's tokens
(teacher-forced), and how many greedy tokens the free-running loops share before they differ;
and how many they share with the compact loop run op by op in eager PyTorch (``compact, torch
ops``: the same arithmetic as the fused and compiled loops, prompt inputs of 4- and 8-bit
layers rounded to int8 included, where transformers' loop keeps a prompt's inputs float).

(Many earlier README runs set ``OMP_WAIT_POLICY=PASSIVE``; on some VMs it slows llama.cpp's
decode, its OpenMP threads sleeping between barriers: 27 against 95 tok/s on a 2-core Intel
Xeon VM, where lowbit's decode moved by 1%, and it lowered lowbit's W8A8 prefill there. Leave
it unset.)

    .venv/bin/python benchmarks/decode_loop.py \\
        [--model smollm2-135m] [--recipes fp32 w4-sym-g32 w4-sym-g32+kv16] [--prompt-tokens 512] \\
        [--prompt-corpus wiki] [--new-tokens 128] [--repeats 3] [--compile] [--llama-cpp] \\
        [--litert]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from lowbit import api
from lowbit.eval import format_table
from lowbit.eval.machine import EnergyMeter, thread_settings
from lowbit.eval.speed import random_prompt, timed_run
from lowbit.formats.spec import AttentionSpec
from lowbit.kernels import decode
from lowbit.nn.attention import install_attention
from lowbit.runtime import Runtime
from lowbit.runtime.llama import LlamaForward, _eps

EAGER = "compact, torch ops"  # lowbit's loop, op by op: what the one-call step replaces
LLAMA_CPP = {
    "w4-sym-g32": "Q4_0",
    "w4-rtn-g32": "Q4_1",
    "w4-sym-g32-bf16": "Q4_0",
    "w4-sym-g32-head8": "Q4_0 + Q8_0 head",
    "w4-sym-g32-head16": "Q4_0 + F16 head",
}


class TorchOps:
    """The compact forward with the decode ops' plain-PyTorch references."""

    def __init__(self, forward: LlamaForward) -> None:
        self.forward = forward

    def new_cache(self, batch: int, capacity: int):
        return self.forward.new_cache(batch, capacity)

    def __call__(self, ids, cache, all_logits=False):
        native = decode._native
        decode._native = lambda *t: False
        try:
            return self.forward(ids, cache, all_logits)
        finally:
            decode._native = native


class Compiled:
    """The decode step with fixed shapes (attention over every slot, masked by position),
    captured once by torch.compile; prefill runs the compact forward."""

    def __init__(self, forward: LlamaForward, capacity: int) -> None:
        from lowbit.kernels.build import native_ops

        if native_ops():
            fake = torch.library.register_fake("lowbit_cpu::affine_linear")
            fake(lambda x, w, s, o, g, b, a: x.new_empty(x.shape[0], w.shape[0]))
        self.forward, self.capacity = forward, capacity  # every cache this size: fixed shapes
        slots = torch.arange(capacity)
        self.causal = slots.unsqueeze(0) <= slots.unsqueeze(1)  # (T, T)
        self.step = torch.compile(self._step, dynamic=False)

    def new_cache(self, batch: int, capacity: int):
        if capacity > self.capacity:
            raise ValueError(f"the compiled step holds {self.capacity} slots, not {capacity}")
        return self.forward.new_cache(batch, self.capacity)

    def _step(self, ids, pos, kc, vc):
        f, (b, t) = self.forward, ids.shape
        cos, sin = f.cos[pos], f.sin[pos]  # (1, D)
        mask = self.causal[pos].view(1, 1, 1, -1)
        x = f.embed(ids)
        split = [f.heads * f.head_dim] + [f.kv_heads * f.head_dim] * 2
        for i, layer in enumerate(f.layers):
            h = decode.rms_norm_reference(x, layer.norm1.weight, _eps(layer.norm1))
            q, k, v = layer.qkv(h).split(split, dim=-1)
            q = decode.rotate(q.view(b, t, f.heads, f.head_dim).transpose(1, 2), cos, sin)
            k = decode.rotate(k.view(b, t, f.kv_heads, f.head_dim).transpose(1, 2), cos, sin)
            kc[i].index_copy_(2, pos, k)
            vc[i].index_copy_(2, pos, v.view(b, t, f.kv_heads, f.head_dim).transpose(1, 2))
            a = torch.nn.functional.scaled_dot_product_attention(
                q, kc[i], vc[i], attn_mask=mask, scale=f.scaling, enable_gqa=True)  # fmt: skip
            x = x + layer.o_proj(a.transpose(1, 2).reshape(b, t, -1))
            h = decode.rms_norm_reference(x, layer.norm2.weight, _eps(layer.norm2))
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(torch.nn.functional.silu(gate) * up)
        return f.head(decode.rms_norm_reference(x, f.norm.weight, _eps(f.norm)))[:, -1]

    def __call__(self, ids, cache, all_logits=False):
        if ids.shape[1] > 1 or all_logits:
            return self.forward(ids, cache, all_logits)
        pos = cache.reserve(1)
        return self.step(ids, torch.tensor([pos]), cache.k, cache.v)


def runtimes(model, capacity: int, compile_step: bool) -> dict[str, Runtime]:
    out = {"transformers": Runtime(model, compact=False)}
    torch_ops = Runtime(model)
    forward = torch_ops.forward_for(capacity)
    if isinstance(forward, LlamaForward):
        torch_ops._forwards["compact"] = TorchOps(forward)
        out[EAGER] = torch_ops
        out["compact, fused"] = Runtime(model)
        if compile_step:
            compiled = Runtime(model)
            compiled._forwards["compact"] = Compiled(LlamaForward(model), capacity)
            out["compact, torch.compile"] = compiled
    return out


def llama_cpp(folder: Path, float_type: str, n_ctx: int, tmp: Path):
    """llama.cpp on the GGUF export of ``folder``, its float tensors (embeddings, output head,
    norms) written as ``float_type``; None without llama-cpp-python or when the folder cannot
    be written as GGUF."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from lowbit.errors import LowbitError
    from lowbit.export import export

    path = tmp / f"{folder.name}-{float_type}.gguf"
    if not (folder / "tokenizer.json").exists():
        stand_in_tokenizer(folder)
    try:
        gguf = export(folder, "gguf", path, float_type=float_type).path
    except LowbitError as exc:  # e.g. a random-weight model without a tokenizer
        print(f"llama.cpp skipped for {folder.name}: {exc}", file=sys.stderr)
        return None
    return Llama(str(gguf), n_ctx=n_ctx, n_threads=torch.get_num_threads(), verbose=False)


def llama_cpp_features() -> str:
    """The instruction sets llama-cpp-python's build uses (its system info), for the table's
    header: a build cannot switch paths at run time, so an AVX2 comparison needs an AVX2 build."""
    try:
        import llama_cpp
    except ImportError:
        return ""
    info = llama_cpp.llama_print_system_info().decode()
    on = [f.split("=")[0].strip() for f in info.split("|") if f.strip().endswith("= 1")]
    isas = [f for f in on if f.startswith("AVX")]
    return f"; llama.cpp {llama_cpp.__version__} built with {', '.join(isas) or 'no AVX'}"


def stand_in_tokenizer(folder: Path) -> None:
    """A GPT-2-style byte-level BPE of the model's vocabulary size in ``folder``: the 256 byte
    tokens, then two-byte tokens, each one merge. Random-weight models (``*-random``) have no
    tokenizer and a GGUF must hold one; the timed prompts are token ids, so it encodes nothing
    here (the benchmark folder is a temporary copy)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    n_vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) == n_vocab:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def litert_loop(folder: Path, capacity: int, tmp: Path) -> Runtime:
    """The decode loop over the LiteRT export of ``folder`` (prefill chunks of 128)."""
    from lowbit.export import LiteRTOptions, export
    from lowbit.models.litert import LiteRTModel

    opts = LiteRTOptions(seqlen=128, kv_cache=True, prefill=128, cache=max(capacity, 128))
    path = export(folder, "litert", tmp / f"{folder.name}.tflite", litert=opts).path
    return Runtime(LiteRTModel(path))


@torch.inference_mode()
def forced_agreement(loop: Runtime, prompt: list[int], ref: list[int]) -> float:
    """Fraction of decode steps whose argmax equals the transformers loop's next token when
    both are fed the transformers loop's tokens (a flip does not derail the rest)."""
    forward = loop.forward_for(len(prompt) + len(ref))
    cache = forward.new_cache(1, len(prompt) + len(ref))
    logits = forward(torch.tensor([prompt]), cache)
    hits = 0
    for i, tok in enumerate(ref):
        hits += int(logits.argmax(-1).item() == tok)
        if i + 1 < len(ref):
            logits = forward(torch.tensor([[tok]]), cache)
    return hits / len(ref)


def corpus_prompt(src, args) -> torch.Tensor:
    """The first ``--prompt-tokens`` tokens of ``--prompt-corpus``'s text, (1, T)."""
    from lowbit.data.corpora import load_corpus
    from lowbit.data.tokens import corpus_ids
    from lowbit.errors import LowbitError

    if src.tokenizer is None:
        raise SystemExit(f"{args.model}: no tokenizer to encode --prompt-corpus with")
    try:
        ids = corpus_ids(load_corpus(args.prompt_corpus), src.tokenizer)
    except LowbitError as exc:
        raise SystemExit(f"--prompt-corpus: {exc}") from None
    if ids.numel() < args.prompt_tokens:
        raise SystemExit(f"{args.prompt_corpus}: {ids.numel()} tokens, fewer than "
                         f"--prompt-tokens {args.prompt_tokens}")  # fmt: skip
    return ids[: args.prompt_tokens].reshape(1, -1)


def equal_before(tokens: list[int], ref: list[int]) -> int:
    """How many greedy tokens two loops share before their first difference."""
    pairs = list(zip(tokens, ref, strict=False))
    return next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))


def llama_cpp_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Prefill, first token, then greedy steps: (prefill s, decode s, tokens)."""
    import time

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tokens = [llm.sample(temp=0.0)]
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(llm.sample(temp=0.0))
    return first - start, time.perf_counter() - first, tokens


def measure(loops: dict, prompt: torch.Tensor, args) -> dict:
    """Alternating runs of every loop (after one warm-up each); medians and greedy tokens,
    by the loops' keys."""
    times: dict[str, list] = {name: [] for name in loops}
    tokens: dict[str, list[int]] = {}
    ids = prompt[0].tolist()
    for name, loop in loops.items():  # warm-up (and compilation)
        if isinstance(loop, Runtime):
            tokens[name] = loop.generate([ids], args.new_tokens).tokens[0]
        else:
            tokens[name] = llama_cpp_run(loop, ids, args.new_tokens)[2]
    for _ in range(args.repeats):
        for name, loop in loops.items():
            if isinstance(loop, Runtime):
                run = timed_run(loop, prompt, args.new_tokens, EnergyMeter("none"))
                times[name].append((run.ttft_s, run.decode_s))
            else:
                times[name].append(llama_cpp_run(loop, ids, args.new_tokens)[:2])
    return {name: {"prefill": args.prompt_tokens / statistics.median(t[0] for t in runs),
                   "decode": (args.new_tokens - 1) / statistics.median(t[1] for t in runs),
                   "tokens": tokens[name]}
            for name, runs in times.items()}  # fmt: skip


def cache_option(name: str) -> tuple[str, AttentionSpec | None]:
    """``RECIPE`` or ``RECIPE+kvN``: the recipe, and the key/value cache that ``--kv-bits N``
    gives at ``lowbit generate`` / ``bench`` (e.g. ``w4-sym-g32-head8+kv16``: a float16
    cache, as llama.cpp keeps by default)."""
    recipe, _, cache = name.partition("+")
    if not cache:
        return recipe, None
    if not (cache.startswith("kv") and cache[2:].isdigit()):
        raise SystemExit(f"{name}: expected RECIPE+kvN (N: 2-8, or 16 for float16)")
    return recipe, AttentionSpec(kv_bits=int(cache[2:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["fp32", "w4-sym-g32"],
                   help="recipes (fp32: the float model); RECIPE+kvN adds --kv-bits N's cache "
                   "(e.g. w4-sym-g32-head8+kv16)")  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--prompt-corpus", metavar="NAME",
                   help="take the prompt from a corpus's text (e.g. wiki: its first tokens) "
                   "instead of random token ids")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add the torch.compile loop")
    p.add_argument("--llama-cpp", action="store_true", help="add llama.cpp on Q4_0/Q4_1 grids")
    p.add_argument("--litert", action="store_true", help="add the LiteRT interpreter")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    src = api.load_model(args.model)
    prompt = corpus_prompt(src, args) if args.prompt_corpus else random_prompt(
        src.model.config.vocab_size, args.prompt_tokens)  # fmt: skip
    capacity = args.prompt_tokens + args.new_tokens
    rows, recipes, first = [], {}, args.recipes[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            recipe, cache = cache_option(name)
            if recipe == "fp32":
                model = src.model if cache is None else api.load_model(args.model).model
            else:
                folder = Path(tmp) / recipe
                if not folder.exists():  # the same folder with and without a cache option
                    q = api.load_model(args.model).model
                    api.save(q, folder, api.quantize(q, recipe, progress=False), source=src)
                model = api.load(folder).model
            if cache is not None:
                install_attention(model, cache)
            loops = recipes[name] = runtimes(model, capacity, args.compile)
            twice = cache is not None and recipe in args.recipes  # llama.cpp's row once
            if args.llama_cpp and recipe in LLAMA_CPP and not twice:
                # f32: the floats lowbit reads; f16: usual. A head the recipe stores (Q8_0,
                # float16) leaves only the embeddings (one row read per token) and norms in
                # float: f32 alone.
                quantized_head = recipe.endswith(("-head8", "-head16"))
                for float_type in ("f32",) if quantized_head else ("f32", "f16"):
                    llm = llama_cpp(folder, float_type, capacity + 8, Path(tmp))
                    if llm is not None:
                        loops[f"llama.cpp {LLAMA_CPP[recipe]}, {float_type} floats"] = llm
            if args.litert and recipe != "fp32":
                loops["LiteRT (XNNPACK)"] = litert_loop(folder, capacity, Path(tmp))
        # every loop of every recipe in one alternation: the ratios between recipes are
        # measured side by side too (this VM's speed drifts between minutes)
        result = measure({(n, k): loop for n, ls in recipes.items() for k, loop in ls.items()},
                         prompt, args)  # fmt: skip
        base = result[(first, "transformers")]["decode"]
        fused = result.get((first, "compact, fused"), {}).get("decode")
        for name, loops in recipes.items():
            ref_tokens = result[(name, "transformers")]["tokens"]
            for loop_name, loop in loops.items():
                r = result[(name, loop_name)]
                same = equal_before(r["tokens"], ref_tokens)
                eager = result.get((name, EAGER), {}).get("tokens")
                same_eager = "-" if eager is None else equal_before(r["tokens"], eager)
                forced = forced_agreement(loop, prompt[0].tolist(), ref_tokens) if isinstance(
                    loop, Runtime) else None  # fmt: skip
                agree = "-" if forced is None else f"{100 * forced:.1f}%"
                rows.append([name, loop_name, round(r["decode"], 2), f"x{r['decode'] / base:.2f}",
                             "-" if fused is None else f"x{r['decode'] / fused:.2f}",
                             round(r["prefill"], 1), agree, same, same_eager])  # fmt: skip
    threads = thread_settings()
    isa = torch.ops.lowbit_cpu.kernel_isa() if decode.native_ops() else "reference"
    kind = f"tokens of {args.prompt_corpus}" if args.prompt_corpus else "random tokens"
    print(f"\n{args.model}: prompt {args.prompt_tokens} {kind}, {args.new_tokens} new "
          f"tokens (greedy, batch 1), {args.repeats} alternating runs, medians; "
          f"{threads['torch_threads']} threads ({threads['cpu_capability']}, kernels {isa}, "
          f"OMP_WAIT_POLICY={threads['omp_wait_policy']}, "
          f"LOWBIT_SPIN_US={threads['lowbit_spin_us']}){llama_cpp_features()}\n")  # fmt: skip
    header = ["recipe", "loop", "decode tok/s", f"x {first} transformers",
              f"x {first} compact fused", "prefill tok/s", "top-1 = transformers loop (forced)",
              "greedy tokens = transformers loop", f"greedy tokens = {EAGER}"]  # fmt: skip
    print(format_table(header, rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

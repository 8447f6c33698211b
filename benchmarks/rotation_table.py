"""Rotations and a rounded key/value cache on the default model, in one run.

Every row is quantized in this process from a fresh copy of the float model (calibrated rows on
`bbc`, the same windows for every row) and scored against the float model on the same `wiki`
windows; each Markdown row is printed as soon as it is measured: perplexity, ratio to float,
KL(fp || q) per token, top-1 agreement, the cache's bytes per token of context relative to
lowbit's float32 cache (codes and float16 scales / minimums included) and the quantization
wall time (rotation, learned rotation and GPTQ included).

    .venv/bin/python benchmarks/rotation_table.py [--rows NAME ...]

Rows: `kv8`, `kv4` (per token and head), `kv4-g32`, `+had` (heads Hadamard-rotated before
rounding), `+ctr` (keys stored minus each layer's mean key, measured on the calibration
text); `float+rot` (the rotation alone: must equal float); `w8a8` (int8 per-channel
weights, 8-bit per-token inputs), `w4a8` (int4 g64 weights),
`w4a4-kv4` (4-bit per-token inputs, 4-bit cache), `w4-gptq` (weight-only), `w4a8-gptq`, each
with and without `+rot` (QuaRot's offline rotation folded into the weights; with a cache,
also its heads rotated); `+online` also turns every `down_proj` input by a Hadamard matrix at
run time (QuaRot's online half); `kv4c`: the cache in groups of 32, rotated, keys centred;
`w3-gptq+rot+online`: int3 g32 GPTQ weights; `+spin` rows train the residual stream's matrix
first (SpinQuant's R1, ``rotate.kind: learned``, 100 calibration windows, on the row's grid
with round to nearest; the heads keep the Hadamard matrix), then quantize as the `+rot` row
(its time is in "quantize s"); `+spin2` also trains each block's head matrix (R2,
``learn_heads: true``); `-mse`:
GPTQ with MSE-clipped group ranges; `+tune`: then every group's scale and offset trained end to
end towards the float model (recipe block ``tune``, its defaults; its time is in "quantize s").
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

from lowbit import api
from lowbit.formats.spec import AttentionSpec
from lowbit.recipes import Recipe
from protocol import add_protocol_options, start

W4 = {"bits": 4, "group_size": 64}
W8 = {"bits": 8, "symmetric": True, "group_size": -1}
TOKEN8 = {"bits": 8, "granularity": "token", "dynamic": True}
TOKEN4 = {"bits": 4, "granularity": "token", "dynamic": True, "symmetric": False}


def rows() -> dict[str, dict]:
    """name -> recipe mapping (lm_head stays in float in every row)."""
    kv = {"kv8": {"kv_bits": 8}, "kv4": {"kv_bits": 4}, "kv4+had": {"kv_bits": 4, "hadamard": True},
          "kv4-g32": {"kv_bits": 4, "group_size": 32},
          "kv4-g32+had": {"kv_bits": 4, "group_size": 32, "hadamard": True},
          "kv4-g32+ctr": {"kv_bits": 4, "group_size": 32, "center_keys": True},
          "kv4-g32+had+ctr": {"kv_bits": 4, "group_size": 32, "hadamard": True,
                              "center_keys": True}}  # fmt: skip
    table = {name: ("rtn", None, None, {"attention": a}) for name, a in kv.items()}
    table["float+rot"] = ("rtn", None, None, {"rotate": {}})  # the folding alone: = float
    for rot in (False, True):
        extra = {"rotate": {}} if rot else {}
        kv4 = {"kv_bits": 4, "hadamard": rot}
        suffix = "+rot" if rot else ""
        table |= {
            f"w8a8{suffix}": ("rtn", W8, TOKEN8, extra),
            f"w4a8{suffix}": ("rtn", W4, TOKEN8, extra),
            f"w4a4-kv4{suffix}": ("rtn", W4, TOKEN4, {**extra, "attention": kv4}),
            f"w4-gptq{suffix}": ("gptq", W4, None, extra),
            f"w4a8-gptq{suffix}": ("gptq", W4, TOKEN8, extra),
        }
    online = {"rotate": {"online": ["down_proj"]}}  # + down_proj's input turned at run time
    kv4c = {"kv_bits": 4, "group_size": 32, "hadamard": True, "center_keys": True}
    table |= {
        "w8a8+rot+online": ("rtn", W8, TOKEN8, online),
        "w4a8+rot+online": ("rtn", W4, TOKEN8, online),
        "w4a4-kv4+rot+online": ("rtn", W4, TOKEN4, {**online, "attention": {"kv_bits": 4,
                                                                            "hadamard": True}}),
        "w4a4-kv4c+rot+online": ("rtn", W4, TOKEN4, {**online, "attention": kv4c}),
        "w4a8-gptq+rot+online": ("gptq", W4, TOKEN8, online),
        "w4-gptq+rot+online": ("gptq", W4, None, online),
        "w3-gptq+rot+online": ("gptq", {"bits": 3, "group_size": 32}, None, online),
    }  # fmt: skip
    spin = {"rotate": {"kind": "learned", "online": ["down_proj"]}}  # SpinQuant's R1
    spin2 = {"rotate": {**spin["rotate"], "learn_heads": True}}  # R1 and each block's R2
    table |= {
        "w4a4-kv4c+spin+online": ("rtn", W4, TOKEN4, {**spin, "attention": kv4c}),
        "w4a4-kv4c+spin2+online": ("rtn", W4, TOKEN4, {**spin2, "attention": kv4c}),
        "w4-gptq+spin2+online": ("gptq", W4, None, spin2),
        "w4-gptq+spin+online": ("gptq", W4, None, spin),
        "w4a8-gptq+spin+online": ("gptq", W4, TOKEN8, spin),
        "w3-gptq+spin+online": ("gptq", {"bits": 3, "group_size": 32}, None, spin),
        "w4-gptq-mse+rot+online": ("gptq", {**W4, "observer": "mse"}, None, online),
        "w4a8-gptq-mse+rot+online": ("gptq", {**W4, "observer": "mse"}, TOKEN8, online),
    }  # fmt: skip
    tune = {**online, "tune": {}}  # + the scales tuned end to end (presets *-best)
    table |= {
        "w4-gptq+rot+online+tune": ("gptq", W4, None, tune),
        "w4a8-gptq+rot+online+tune": ("gptq", W4, TOKEN8, tune),
        "w3-gptq+rot+online+tune": ("gptq", {"bits": 3, "group_size": 32}, None, tune),
    }
    return {name: {"version": 1, "name": name, "algorithm": algo, "weights": w,
                   "activations": a, "ignore": ["lm_head"], **extra}
            for name, (algo, w, a, extra) in table.items()}  # fmt: skip


def _cache_ratio(spec: AttentionSpec | None, head_dim: int) -> str:
    if spec is None:
        return "1"
    return f"{spec.bytes_per_value(head_dim) / (4 * head_dim):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    add_protocol_options(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lowbit.pipeline.spin").setLevel(logging.INFO)  # the learned Q's loss
    table = rows()
    src, calib, fp = start(args, table)
    cfg = src.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    print("| row | weights | activations | cache | rotation | ppl | x fp | KL | top-1 | "
          "cache bytes x fp32 | quantize s |")  # fmt: skip
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.rows or table:  # printed as measured: a stopped run keeps its rows
        recipe = Recipe.from_dict(table[name])
        print(f"quantizing {name} ...", file=sys.stderr, flush=True)
        model = copy.deepcopy(src.model)
        data = calib if recipe.needs_calibration else None
        start_s = time.perf_counter()
        api.quantize(model, recipe, data, progress=False)
        seconds = time.perf_counter() - start_s
        r = api.evaluate({name: model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                         ref=src.model, progress=False)[name]  # fmt: skip
        w = "float" if recipe.weights is None else f"{recipe.algorithm} {recipe.weights.short()}"
        a = "-" if recipe.activations is None else recipe.activations.short()
        cache = "-" if recipe.attention is None else recipe.attention.short()
        rot = "-" if recipe.rotate is None else recipe.rotate.kind
        if recipe.rotate is not None and recipe.rotate.online:
            rot += " + online " + "/".join(recipe.rotate.online)
        print(f"| {name} | {w} | {a} | {cache} | {rot} | {r.ppl:.3f} | {r.ppl / fp.ppl:.4f} | "
              f"{r.kl:.4f} | {r.top1:.3f} | {_cache_ratio(recipe.attention, head_dim)} | "
              f"{seconds:.1f} |", flush=True)  # fmt: skip
        del model


if __name__ == "__main__":
    main()

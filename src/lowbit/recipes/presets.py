"""Named recipes. Each is plain recipe data, shown in full by ``lowbit presets NAME``."""

from __future__ import annotations

from typing import Any

_KEEP_HEAD = ["lm_head"]  # the output projection is usually tied to the embeddings and sensitive
# conv-w8a8-steps: ranges per layer, one per fifth of the timestep axis: any sampler of 5 or more
# steps reaches each slice (benchmarks/ddpm_table.py: 5 and 25 both beat one range)
STEP_GROUPS = 5


def _weights(bits: int, group: int, symmetric: bool = False, **extra: Any) -> dict[str, Any]:
    return {"bits": bits, "symmetric": symmetric, "group_size": group, **extra}


def preset_table() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (one-line description, recipe mapping)."""
    table = {
        "w8-rtn": ("int8 symmetric per-channel weights, round-to-nearest", _weights(8, -1, True)),
        "w4-rtn-g128": ("int4 asymmetric, groups of 128", _weights(4, 128)),
        "w4-rtn-g64": ("int4 asymmetric, groups of 64 (the default)", _weights(4, 64)),
        "w4-rtn-g32": ("int4 asymmetric, groups of 32 (GGUF Q4_1's grid)", _weights(4, 32)),
        "w4-sym-g32": ("int4 symmetric, groups of 32 (GGUF Q4_0's grid)", _weights(4, 32, True)),
        "w4-rtn-channel": ("int4 asymmetric per-channel", _weights(4, -1)),
        "w4-sym-g32-bf16": ("int4 symmetric g32, bfloat16 scales (what LiteRT's CPU runs exactly)",
                            _weights(4, 32, True, scale_dtype="bfloat16")),
        "w3-rtn-g64": ("int3 asymmetric, groups of 64", _weights(3, 64)),
        "w3-rtn-g32": ("int3 asymmetric, groups of 32", _weights(3, 32)),
        "w2-rtn-g32": ("int2 asymmetric, groups of 32 (usually too lossy alone)", _weights(2, 32)),
        "nf4-g64": ("NormalFloat-4 with absmax scales per 64", {"format": "nf4", "group_size": 64}),
        "fp8-e4m3": ("fp8 e4m3 weights, per-channel scales", {
            "format": "fp8_e4m3", "bits": 8, "group_size": -1}),
    }  # fmt: skip
    calibrated = {
        "w4-hqq-g64": ("hqq", "int4 asymmetric g64, HQQ ranges (no data)", _weights(4, 64)),
        "w3-hqq-g32": ("hqq", "int3 asymmetric g32, HQQ ranges (no data)", _weights(3, 32)),
        "w4-gptq-g64": ("gptq", "int4 asymmetric g64, GPTQ with act-order", _weights(4, 64)),
        "w3-gptq-g32": ("gptq", "int3 asymmetric g32, GPTQ with act-order", _weights(3, 32)),
        "w4-gptq-sym-g64-bf16": ("gptq", "int4 symmetric g64, GPTQ, bfloat16 scales (LiteRT-exact)",
                                 _weights(4, 64, True, scale_dtype="bfloat16")),
        "w4-gptq-channel": ("gptq", "int4 asymmetric per-channel, GPTQ", _weights(4, -1)),
        "w4-awq-g64": ("awq", "int4 asymmetric g64, AWQ scales and clipping", _weights(4, 64)),
        "w3-awq-g32": ("awq", "int3 asymmetric g32, AWQ scales and clipping", _weights(3, 32)),
        "w4-awq-gptq-g64": ("awq+gptq", "int4 asym g64, AWQ scales then GPTQ", _weights(4, 64)),
        "w4-awq-gptq-mse-g64": ("awq+gptq", "int4 asym g64, AWQ then GPTQ, MSE-clipped groups",
                                _weights(4, 64, observer="mse")),
        "w4-autoround-g64": ("autoround", "int4 asym g64, AutoRound learned rounding and clipping",
                             _weights(4, 64)),
        "w3-autoround-g32": ("autoround", "int3 asym g32, AutoRound learned rounding and clipping",
                             _weights(3, 32)),
        "w3-kmeans-channel": ("kmeans", "3-bit K-means codebook per row, activation-weighted",
                              {"bits": 3, "group_size": -1}),
        "w3-gptq-g64-lorc8": ("gptq", "int3 asym g64, GPTQ + rank-8 LoRC error correction",
                              _weights(3, 64, lorc_rank=8)),
    }  # fmt: skip
    out = {name: (desc, _recipe(name, "rtn", weights)) for name, (desc, weights) in table.items()}
    out |= {name: (desc, _recipe(name, algo, w)) for name, (algo, desc, w) in calibrated.items()}
    out |= _other_presets()
    out |= _activation_presets()
    out |= _image_presets()
    out |= _attention_presets()
    out |= _best_presets()
    return out


def _best_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """The best recipe measured for a setting on the default model (README's tables, same
    protocol): the name says what it is for, the description what it does."""
    token8 = {"bits": 8, "granularity": "token", "dynamic": True}
    # + scales tuned end to end; a model that cannot take the rotation (or its online part)
    # goes without it, with a warning
    online = {"rotate": {"online": ["down_proj"], "if_possible": True}, "tune": {}}
    w4a8 = {**_recipe("w4a8-best", "gptq", _weights(4, 64)), "activations": token8, **online}
    w4 = {**_recipe("w4-g64-best", "gptq", _weights(4, 64)), **online}
    w3 = {**_recipe("w3-g32-best", "gptq", _weights(3, 32)), **online}
    how = ("Hadamard rotation folded + online before down_proj (where the model takes them), "
           "GPTQ weights, scales tuned")  # fmt: skip
    return {
        "w4-g64-best": (f"int4 asym g64: {how}", w4),
        "w3-g32-best": (f"int3 asym g32: {how}", w3),
        "w4a8-best": (f"W4A8 g64: {how}, per-token 8-bit inputs", w4a8),
    }


def _attention_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """The key/value cache alone (weights stay as they are: combine with a weight recipe by
    adding its ``attention`` block, or ``--kv-bits`` at eval / bench / generate)."""
    kv8 = {"version": 1, "name": "kv8", "algorithm": "rtn", "weights": None,
           "attention": {"kv_bits": 8}}  # fmt: skip
    kv4 = {"version": 1, "name": "kv4", "algorithm": "rtn", "weights": None,
           "attention": {"kv_bits": 4, "group_size": 32, "hadamard": True,
                         "center_keys": True}}  # fmt: skip
    return {
        "kv8": ("float weights, 8-bit key/value cache (per token and head, asymmetric)", kv8),
        "kv4": (
            "float weights, 4-bit key/value cache (groups of 32), Hadamard-rotated heads, "
            "keys centred (measured on the calibration text)",
            kv4,
        ),
    }


def _image_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """Convolutional image models: activations are rounded per tensor (no per-token range)."""
    acts = {"bits": 8, "granularity": "tensor", "dynamic": False, "symmetric": False,
            "observer": "minmax"}  # fmt: skip
    image = {"activations": acts, "ignore": []}  # no language-model head to keep
    static = {**_recipe("conv-w8a8-static", "rtn", _weights(8, -1, True)), **image}
    gptq = {**_recipe("conv-w8a8-gptq", "gptq", _weights(8, -1, True)), **image}
    weight_only = {**_recipe("conv-w8-gptq", "gptq", _weights(8, -1, True)), "ignore": []}
    best = {**_recipe("conv-w8a8-best", "gptq", _weights(8, -1, True)), **image,
            "smoothquant": {}}  # fmt: skip
    steps = {**_recipe("conv-w8a8-steps", "rtn", _weights(8, -1, True)),
             "activations": {**acts, "step_groups": STEP_GROUPS}, "ignore": []}  # fmt: skip
    return {
        "conv-w8a8-static": ("image models: int8 per-channel weights, one calibrated 8-bit "
                             "range per layer (min-max)", static),
        "conv-w8a8-gptq": ("image models: as conv-w8a8-static with GPTQ weights (im2col "
                           "Hessians)", gptq),
        "conv-w8a8-best": ("image models: as conv-w8a8-gptq after SmoothQuant factors (each "
                           "pair's α chosen on the model's output)", best),
        "conv-w8-gptq": ("image models: int8 per-channel GPTQ weights, float activations (the "
                         "closest to float, where 8-bit activations cost too much)", weight_only),
        "conv-w8a8-steps": (f"diffusion samplers: as conv-w8a8-static with {STEP_GROUPS} "
                            f"ranges per layer, one per slice of the timesteps", steps),
    }  # fmt: skip


def _activation_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """Weights and activations: SmoothQuant, static ranges, ZeroQuant (+ LKD)."""
    token8 = {"bits": 8, "granularity": "token", "dynamic": True}
    static8 = {"bits": 8, "granularity": "tensor", "dynamic": False, "observer": "minmax"}
    table = {
        "w8a8-smoothquant": ("rtn", "W8A8 per-token dynamic, SmoothQuant alpha searched per group",
                             _weights(8, -1, True), token8, {"smoothquant": {}}),
        "w8a8-static": ("rtn", "int8 weights, one calibrated 8-bit range per layer (min-max), "
                        "SmoothQuant", _weights(8, -1, True), static8, {"smoothquant": {}}),
        "w8a8-zeroquant": ("rtn", "ZeroQuant: int8 symmetric g64 weights, per-token 8-bit inputs",
                           _weights(8, 64, True), token8, {}),
        "w4a8-zeroquant": ("rtn", "ZeroQuant: int4 asymmetric g64 weights, per-token 8-bit inputs",
                           _weights(4, 64), token8, {}),
        "w4a8-zeroquant-lkd": ("rtn", "ZeroQuant W4A8 g64 + layer-wise distillation (LKD)",
                               _weights(4, 64), token8, {"lkd": {}}),
        "w4a8-gptq-lkd": ("gptq", "W4A8 g64: GPTQ weights, per-token 8-bit inputs, then LKD",
                          _weights(4, 64), token8, {"lkd": {}}),
    }  # fmt: skip
    out = {}
    for name, (algorithm, desc, weights, acts, extra) in table.items():
        out[name] = (desc, {**_recipe(name, algorithm, weights), "activations": acts, **extra})
    return out


def _other_presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """Half-precision storage, W8A8 and a mixed-precision example."""
    w8a8 = _recipe("w8a8-dynamic", "rtn", _weights(8, -1, True))
    w8a8["activations"] = {"bits": 8, "granularity": "token", "dynamic": True}
    w8a8head = {**w8a8, "name": "w8a8-dynamic-head8", "ignore": []}  # the head W8A8 too
    mixed = _recipe("w4-g64-down8", "rtn", _weights(4, 64))
    mixed["overrides"] = [{"match": "re:.*\\.down_proj$", "weights": _weights(8, -1, True)}]
    head8 = _recipe("w4-g64-head8", "rtn", _weights(4, 64))
    head8["ignore"] = []
    head8["overrides"] = [{"match": "lm_head", "weights": _weights(8, -1, True)}]
    q4head8 = _recipe("w4-sym-g32-head8", "rtn", _weights(4, 32, True))
    q4head8["ignore"] = []
    q4head8["overrides"] = [{"match": "lm_head", "weights": _weights(8, 32, True)}]
    head16 = _recipe("w4-g64-head16", "rtn", _weights(4, 64))
    head16["ignore"] = []
    head16["overrides"] = [{"match": "lm_head", "weights": {"format": "fp16", "bits": 16}}]
    q4head16 = _recipe("w4-sym-g32-head16", "rtn", _weights(4, 32, True))
    q4head16["ignore"] = []
    q4head16["overrides"] = head16["overrides"]
    return {
        "bf16": ("bfloat16 weight storage, float32 compute", _recipe(
            "bf16", "rtn", {"format": "bf16", "bits": 16})),
        "fp16": ("float16 weight storage, float32 compute", _recipe(
            "fp16", "rtn", {"format": "fp16", "bits": 16})),
        "w8a8-dynamic": ("int8 per-channel weights x int8 per-token dynamic activations", w8a8),
        "w8a8-dynamic-head8": ("w8a8-dynamic with the output head W8A8 too (a quarter of a "
                               "float32 head's bytes per decoded token)", w8a8head),
        "w4-g64-down8": ("mixed: int4 asymmetric g64, down_proj int8 per-channel", mixed),
        "w4-g64-head8": ("int4 asymmetric g64, output head int8 per-channel (llama.cpp-like)",
                         head8),
        "w4-g64-head16": ("int4 asymmetric g64, output head stored in float16", head16),
        "w4-sym-g32-head8": ("GGUF Q4_0's grid, output head int8 symmetric g32 (Q8_0's grid)",
                             q4head8),
        "w4-sym-g32-head16": ("GGUF Q4_0's grid, output head stored in float16 (what a "
                              "llama.cpp Q4_0 file with float16 floats reads)", q4head16),
    }  # fmt: skip


def _recipe(name: str, algorithm: str, weights: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "name": name, "algorithm": algorithm, "weights": weights,
            "ignore": list(_KEEP_HEAD)}  # fmt: skip

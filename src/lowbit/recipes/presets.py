"""Named recipes. Each is plain recipe data, shown in full by ``lowbit presets NAME``."""

from __future__ import annotations

from typing import Any

_KEEP_HEAD = ["lm_head"]  # the output projection is usually tied to the embeddings and sensitive


def _weights(bits: int, group: int, symmetric: bool = False, **extra: Any) -> dict[str, Any]:
    return {"bits": bits, "symmetric": symmetric, "group_size": group, **extra}


def preset_table() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (one-line description, recipe mapping)."""
    table = {
        "w8-rtn": ("int8 symmetric per-channel weights, round-to-nearest", _weights(8, -1, True)),
        "w4-rtn-g128": ("int4 asymmetric, groups of 128", _weights(4, 128)),
        "w4-rtn-g64": ("int4 asymmetric, groups of 64 (the default)", _weights(4, 64)),
        "w4-rtn-g32": ("int4 asymmetric, groups of 32 (GGUF Q4_1's grid)", _weights(4, 32)),
        "w4-rtn-channel": ("int4 asymmetric per-channel", _weights(4, -1)),
        "w3-rtn-g64": ("int3 asymmetric, groups of 64", _weights(3, 64)),
        "w3-rtn-g32": ("int3 asymmetric, groups of 32", _weights(3, 32)),
        "w2-rtn-g32": ("int2 asymmetric, groups of 32 (usually too lossy alone)", _weights(2, 32)),
        "nf4-g64": ("NormalFloat-4 with absmax scales per 64", {"format": "nf4", "group_size": 64}),
        "fp8-e4m3": ("fp8 e4m3 weights, per-channel scales", {
            "format": "fp8_e4m3", "bits": 8, "group_size": -1}),
    }  # fmt: skip
    return {
        name: (desc, {"version": 1, "name": name, "algorithm": "rtn", "weights": weights,
                      "ignore": list(_KEEP_HEAD)})
        for name, (desc, weights) in table.items()
    }  # fmt: skip

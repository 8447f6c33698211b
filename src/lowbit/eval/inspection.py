"""What a lowbit folder holds, read from its manifest and safetensors header (no model load)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowbit.eval.size import folder_layer_bytes, tensor_bytes
from lowbit.eval.table import format_table
from lowbit.models.checkpoint import read_manifest, weight_files
from lowbit.models.tensorfile import Entry, read_header
from lowbit.models.verify import check_tensors, manifest_layers, verify_hashes


def inspect_folder(folder: Path, verify: bool = False) -> dict[str, Any]:
    """Per-layer formats and bytes, totals, and the manifest, after checking the folder (every
    shard's size against its header, every manifest layer against its tensors; with
    ``verify``, every shard's sha256 against the manifest). ``bits_per_weight`` at the top
    level is over the quantized layers, scale and zero overhead included."""
    manifest = read_manifest(folder)
    plans = manifest_layers(manifest)
    files = weight_files(Path(folder))
    entries: dict[str, Entry] = {}
    for path in files:  # every shard's header, checked against its size (truncation)
        entries.update(read_header(path)[0])
    check_tensors(plans, entries)
    verified = verify_hashes(Path(folder), manifest, weight_files(folder)) if verify else None
    header = {n: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
              for n, e in entries.items()}  # fmt: skip
    layers, qweights, qbytes = {}, 0, 0
    for name, plan in plans.items():
        info = manifest["layers"][name]
        b = folder_layer_bytes(header, name)
        n = plan.in_features * plan.out_features
        qweights += n
        qbytes += b["codes"] + b["params"]
        layers[name] = {
            "format": info.get("format"),
            "shape": [plan.out_features, plan.in_features],
            "bytes": b,
            "bits_per_weight": round(8.0 * (b["codes"] + b["params"]) / n, 6),
            "weight_sqnr_db": info.get("weight_sqnr_db"),
            "output_sqnr_db": info.get("output_sqnr_db"),
        }
    total = sum(tensor_bytes(e) for e in header.values())
    return {
        "folder": str(folder),
        "bits_per_weight": round(8.0 * qbytes / qweights, 6) if qweights else None,
        "quantized_layers": len(layers),
        "quantized_weights": qweights,
        "quantized_bytes": qbytes,
        "float_bytes": total - qbytes,
        "tensor_bytes": total,
        "file_bytes": sum(os.path.getsize(p) for p in files),
        "files": [p.name for p in files],
        "verified_files": verified,
        "layers": layers,
        "manifest": {k: v for k, v in manifest.items() if k != "layers"},
    }


def render_inspection(info: dict[str, Any]) -> str:
    """Human-readable summary: totals, the formats used, and the per-layer table."""
    m = info["manifest"]
    recipe = _mapping(m.get("recipe"))
    source = _mapping(m.get("source")).get("model")
    lines = [
        f"{info['folder']}: lowbit {m.get('lowbit_version')}, source {source}",
        f"recipe: {recipe.get('name') or '(custom)'} algorithm={recipe.get('algorithm')}",
        f"quantized layers: {info['quantized_layers']} ({info['quantized_weights']:,} weights), "
        f"{info['bits_per_weight']} bits/weight incl. scales/zeros",
        f"bytes: quantized {info['quantized_bytes']:,}  float {info['float_bytes']:,}  "
        f"file {info['file_bytes']:,}",
    ]
    for key, what in (("rotate", "rotation folded into the weights"),
                      ("attention", "attention inputs rounded at run time")):  # fmt: skip
        if recipe.get(key) is not None:
            lines.append(f"{key}: {recipe[key]} ({what})")
    if info.get("verified_files"):
        lines.append(f"verified: {info['verified_files']} weight files match their sha256")
    metrics = _mapping(_mapping(m.get("metrics")).get("eval"))
    if {"ppl", "corpus", "seqlen", "tokens"} <= metrics.keys():
        lines.append(
            f"measured: ppl {metrics['ppl']:.3f} KL {metrics.get('kl')} "
            f"top-1 {metrics.get('top1')} "
            f"({metrics['corpus']}, seqlen {metrics['seqlen']}, {metrics['tokens']} tokens)"
        )
    rows = [
        [name, layer["format"], "x".join(map(str, layer["shape"])), layer["bits_per_weight"],
         layer["weight_sqnr_db"], layer.get("output_sqnr_db")]
        for name, layer in info["layers"].items()
    ]  # fmt: skip
    head = ["layer", "format", "shape", "bits/w", "weight SQNR dB", "output SQNR dB (calib)"]
    lines += ["", format_table(head, rows)]
    blocks = [b for b in m.get("blocks") or [] if isinstance(b, dict)
              and isinstance(b.get("output_rel_mse"), (int, float))]  # fmt: skip
    if blocks:
        worst = max(blocks, key=lambda b: b["output_rel_mse"])
        lines.append(f"\nblock output error (relative MSE, sequential runner): "
                     f"{len(blocks)} blocks, worst {worst['block']} "
                     f"{worst['output_rel_mse']:.3e}")  # fmt: skip
    return "\n".join(lines)


def _mapping(value: Any) -> dict[str, Any]:
    """A manifest field that should be a mapping, or an empty one (what it holds is only shown)."""
    return value if isinstance(value, dict) else {}

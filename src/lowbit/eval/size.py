"""How big a model is: bits per weight of the quantized layers (overhead included), bytes of
everything else, in memory and in a saved folder (read from the safetensors header alone)."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn import QUANTIZED_MODULES


@dataclass
class SizeReport:
    quantized_weights: int  # number of weights in quantized layers
    quantized_bytes: int  # their codes + scales + zeros
    float_bytes: int  # everything else held (embeddings, norms, biases, float layers)
    total_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the quantized layers, scale and zero overhead included."""
        if not self.quantized_weights:
            return float("nan")
        return 8.0 * self.quantized_bytes / self.quantized_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": round(self.bits_per_weight, 6)}


def model_size(model: nn.Module) -> SizeReport:
    """Sizes of an in-memory model (tied tensors counted once). Models loaded on the kernels
    count their layers in the kernels' layouts (float32 scales and offsets where float16 does
    not hold them exactly: then more bits/weight than on disk)."""
    qweights = qbytes = 0
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            b = module.storage_bytes()
            qweights += module.in_features * module.out_features
            qbytes += b["codes"] + b["params"]
    quant_ids = {
        id(t)
        for m in model.modules()
        if isinstance(m, QUANTIZED_MODULES)
        for t in m.storage_tensors()
    }
    fbytes = held_bytes(model, quant_ids)
    if hasattr(model, "file_bytes") and not qweights and not fbytes:  # a LiteRT export: its file
        return SizeReport(0, 0, model.file_bytes(), model.file_bytes())
    return SizeReport(qweights, qbytes, fbytes, qbytes + fbytes)


def held_bytes(model: nn.Module, skip: set[int]) -> int:
    """Bytes of the model's parameters and buffers other than those whose ``id`` is in
    ``skip``, each tensor counted once (tied tensors are one), views of one storage each by
    their own size (a mixture's float experts are views of one 3-D weight)."""
    seen: set[tuple] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if id(t) in skip or (key in seen and not t.is_meta):
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise LowbitError(f"cannot read the safetensors header of {path}: {exc}") from None
    header.pop("__metadata__", None)
    return header


def tensor_bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def folder_layer_bytes(header: dict, layer: str) -> dict[str, int]:
    """Bytes of one QuantLinear's tensors in a saved file: codes, params (scale + zero), bias."""

    def get(suffix: str) -> int:
        entry = header.get(f"{layer}.{suffix}")
        return tensor_bytes(entry) if entry else 0

    params = get("scale") + get("zero") + get("lorc_u") + get("lorc_v")
    return {"codes": get("qweight"), "params": params, "bias": get("bias")}

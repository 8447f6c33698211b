"""Checking a lowbit folder before trusting it: the manifest's layers (every key present, every
format in range), their tensors in the shards (present, with the shapes and dtypes the manifest
implies), and, on request, the shards' sha256 against those recorded when the folder was saved.
Each problem is one error naming the file, layer or key; loaders and ``lowbit inspect`` run the
same checks, so a damaged folder is refused before any tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.assets import sha256_file
from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.tensorfile import CODES, Entry
from lowbit.nn import QuantConv, QuantLinear
from lowbit.nn.quant_conv import ConvGeometry

MANIFEST = "lowbit.json"


@dataclass(frozen=True)
class LayerPlan:
    """One quantized layer as the manifest describes it."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    weights: WeightSpec
    activations: ActivationSpec | None
    conv: ConvGeometry | None = None

    def build(self, device: str | torch.device | None = None) -> QuantLinear:
        with torch.device(device or "cpu"):
            if self.conv is not None:
                return QuantConv(self.conv, self.weights, self.bias, layer=self.name,
                                 act=self.activations)  # fmt: skip
            return QuantLinear(self.in_features, self.out_features, self.weights, self.bias,
                               act=self.activations)  # fmt: skip


def manifest_layers(manifest: dict[str, Any]) -> dict[str, LayerPlan]:
    """The manifest's quantized layers, each checked (one error naming the layer and key)."""
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise LowbitError(f"{MANIFEST}: 'layers' must be a mapping of layer names")
    plans = {}
    for name, info in layers.items():
        where = f"{MANIFEST}: layers.{name}"
        if not isinstance(info, dict):
            raise LowbitError(f"{where}: expected a mapping")
        sizes = []
        for key in ("in_features", "out_features"):
            value = info.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LowbitError(f"{where}.{key}: expected a positive integer, got {value!r}")
            sizes.append(value)
        if not isinstance(info.get("bias"), bool):
            raise LowbitError(f"{where}.bias: expected true or false, got {info.get('bias')!r}")
        if not isinstance(info.get("weights"), dict):
            raise LowbitError(f"{where}.weights: expected a mapping")
        spec = WeightSpec.from_dict(info["weights"], f"{where}.weights")
        acts = info.get("activations")
        if acts is not None and not isinstance(acts, dict):
            raise LowbitError(f"{where}.activations: expected a mapping")
        act = None if acts is None else ActivationSpec.from_dict(acts, f"{where}.activations")
        conv = (
            None
            if info.get("conv") is None
            else ConvGeometry.from_dict(info["conv"], f"{where}.conv")
        )
        if conv is not None and conv.shape != (sizes[1], sizes[0]):
            raise LowbitError(f"{where}.conv: its shape {conv.shape} disagrees with "
                              f"out_features, in_features {sizes[1], sizes[0]}")  # fmt: skip
        plans[name] = LayerPlan(name, sizes[0], sizes[1], info["bias"], spec, act, conv)
    return plans


def check_tensors(plans: dict[str, LayerPlan], header: dict[str, Entry]) -> None:
    """Every planned layer's tensors are in ``header`` with the shapes and dtypes its format
    implies, and every layer with packed codes in ``header`` is planned (one error naming the
    tensor and its file)."""
    for full, entry in header.items():
        owner, _, key = full.rpartition(".")
        if key == "qweight" and owner not in plans:
            raise LowbitError(f"{entry.path.name} holds packed codes for {owner}, which "
                              f"{MANIFEST} does not list")  # fmt: skip
    for name, plan in plans.items():
        try:
            expected = plan.build("meta").state_dict()
        except (ValueError, RuntimeError) as exc:
            raise LowbitError(f"{MANIFEST}: layers.{name}: {exc}") from None
        for key, t in expected.items():
            full = f"{name}.{key}"
            entry = header.get(full)
            if entry is None:
                raise LowbitError(f"{full} is listed in {MANIFEST} but in no weight file")
            want = (CODES.get(t.dtype), tuple(t.shape))
            if (entry.dtype, tuple(entry.shape)) != want:
                raise LowbitError(f"{full} in {entry.path.name} is {entry.dtype} "
                                  f"{list(entry.shape)}; {MANIFEST} implies {want[0]} "
                                  f"{list(want[1])}")  # fmt: skip


def file_hashes(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """What :func:`verify_hashes` checks later: each weight file's size and sha256."""
    out = {}
    for name in names:
        path = Path(folder) / name
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def verify_hashes(folder: Path, manifest: dict[str, Any], loaded: list[Path]) -> int:
    """Recompute the weight files' sha256 against the manifest, which must record exactly the
    files a load reads (``loaded``: the index's shards, or the one file); returns the files
    checked."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise LowbitError(f"{folder}/{MANIFEST} records no file hashes (saved by an older "
                          f"lowbit); nothing to verify against")  # fmt: skip
    unrecorded = sorted({p.name for p in loaded} - set(recorded))
    if unrecorded:  # read at load (the index names it), yet checked against nothing
        raise LowbitError(f"{Path(folder) / unrecorded[0]} is loaded (the shard index lists "
                          f"it) but {MANIFEST} records no sha256 for it: the folder was "
                          f"changed after it was saved")  # fmt: skip
    unread = sorted(set(recorded) - {p.name for p in loaded})
    if unread:
        raise LowbitError(f"{MANIFEST} records {unread[0]}, which the shard index does not "
                          f"list: the folder was changed after it was saved")  # fmt: skip
    for name, info in recorded.items():
        path = Path(folder) / name
        if Path(name).name != name or not path.is_file():
            raise LowbitError(f"{path} is listed in {MANIFEST} but missing")
        if not isinstance(info, dict) or path.stat().st_size != info.get("bytes"):
            raise LowbitError(f"{path} has {path.stat().st_size:,} bytes; {MANIFEST} recorded "
                              f"{(info or {}).get('bytes')}")  # fmt: skip
        if sha256_file(path) != info.get("sha256"):
            raise LowbitError(f"{path} does not match the sha256 {MANIFEST} recorded: the file "
                              f"changed after it was saved")  # fmt: skip
    return len(recorded)

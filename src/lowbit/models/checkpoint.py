"""lowbit output folders: packed safetensors + source config/tokenizer + ``lowbit.json``.

Saving writes into a temporary folder beside the target and renames it into place, so an
interrupted save never leaves a partial folder. Loading rebuilds the model skeleton without
allocating float weights (accelerate's ``init_empty_weights``), swaps in :class:`QuantLinear`
modules as the manifest lists them, and assigns the saved tensors: no pickle is ever read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.assets import atomic_dir
from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.modules import set_module
from lowbit.nn import QuantLinear

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
MANIFEST_VERSION = 1


def save_folder(
    model: nn.Module,
    folder: Path,
    manifest: dict[str, Any],
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its QuantLinear layers) to ``folder`` atomically."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise LowbitError(f"{folder} already exists; choose another --out or pass --overwrite")
    state = _unique_tensors(model.state_dict())
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "lowbit"})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _save_config(config, tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        body = {"format": "lowbit", "manifest_version": MANIFEST_VERSION, **manifest}
        (tmp / MANIFEST).write_text(json.dumps(body, indent=1, default=str))
    return folder


def _save_config(config: Any, folder: Path) -> None:
    """config.json of the source model, marked so plain transformers refuses it clearly
    (it cannot read lowbit's packed tensors; export to compressed-tensors for that)."""
    data = config.to_dict()
    data["quantization_config"] = {"quant_method": "lowbit", "see": MANIFEST}
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied weights) and make tensors contiguous for safetensors."""
    seen: set[tuple] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{folder} is not a lowbit folder (no {MANIFEST})") from None
    except ValueError as exc:
        raise LowbitError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != "lowbit" or "layers" not in manifest:
        raise LowbitError(f"{path} is not a lowbit manifest")
    if manifest.get("manifest_version", 0) > MANIFEST_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit; upgrade lowbit to read it")
    return manifest


def load_folder(folder: Path, skeleton: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """(model, manifest) from a lowbit folder; ``skeleton`` for models that are not HF ones."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = skeleton if skeleton is not None else _hf_skeleton(folder)
    for name, info in manifest["layers"].items():
        spec = WeightSpec.from_dict(info["weights"], f"{MANIFEST}: layers.{name}.weights")
        acts = info.get("activations")
        act = None if acts is None else ActivationSpec.from_dict(acts, f"layers.{name}.activations")
        layer = QuantLinear(info["in_features"], info["out_features"], spec, info["bias"], act=act)
        set_module(model, name, layer)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise LowbitError(f"cannot read {folder / WEIGHTS}: {exc}") from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise LowbitError(f"{WEIGHTS} has tensors the model lacks: {result.unexpected_keys[:3]}")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise LowbitError(f"{WEIGHTS} is missing tensors: {empty[:3]}")
    return model.eval(), manifest


def _hf_skeleton(folder: Path) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read the model config in {folder}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)

"""lowbit output folders: packed safetensors + source config/tokenizer + ``lowbit.json``.

Saving writes into a temporary folder beside the target and renames it into place, so an
interrupted save never leaves a partial folder. Weights go in sharded safetensors as
transformers writes them (one ``model.safetensors``, or shards with an index), one unit per
decoder block, in the same order and bytes whether the model was quantized in memory or
streamed from disk. Loading rebuilds the model skeleton without
allocating float weights (accelerate's ``init_empty_weights``), swaps in :class:`QuantLinear`
modules as the manifest lists them, and assigns the saved tensors: no pickle is ever read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.algorithms.rotate import RotateOptions
from lowbit.assets import atomic_dir
from lowbit.errors import LowbitError
from lowbit.models.arena import move_into_arena
from lowbit.models.families import find_blocks
from lowbit.models.modules import set_module
from lowbit.models.normalize import checkpoint_state
from lowbit.models.rotate import install_online_rotations
from lowbit.models.source import skeleton as hf_skeleton
from lowbit.models.tensorfile import Entry, Item, read_header, write_file
from lowbit.models.verify import MANIFEST, check_tensors, file_hashes, manifest_layers
from lowbit.nn import QuantLinear
from lowbit.nn.attention import add_key_centers, attention_spec
from lowbit.typed import from_mapping

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MANIFEST_VERSION = 1
MAX_SHARD_BYTES = 2 * 1024**3  # transformers' shard size for large checkpoints is of this order
_META = {"format": "pt", "producer": "lowbit"}


def save_folder(
    model: nn.Module,
    folder: Path,
    manifest: dict[str, Any],
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its QuantLinear layers) to ``folder`` atomically: the same shards,
    bytes and index as a streamed run of the same quantization writes."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_shards(tmp, model_units(model))
        write_extras(tmp, model, tokenizer)
        write_manifest(tmp, manifest)
    return folder


def model_units(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The model's tensors split as a streamed run writes them: one unit per decoder block, in
    order, then everything else (a model without blocks is one unit)."""
    state = _unique_tensors(checkpoint_state(model))
    try:
        prefix, blocks = find_blocks(model)
    except LowbitError:
        return [state]
    units = []
    for i in range(len(blocks)):
        head = f"{prefix}.{i}."
        units.append({k: v for k, v in state.items() if k.startswith(head)})
    inside = {k for unit in units for k in unit}
    return [*units, {k: v for k, v in state.items() if k not in inside}]


def write_shards(
    folder: Path, units: list[Mapping[str, Item]], max_bytes: int | None = None
) -> list[str]:
    """Group consecutive units into shards of at most ``max_bytes`` (a larger unit stands
    alone) and write them as transformers names them: ``model.safetensors`` alone, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``."""
    max_bytes = MAX_SHARD_BYTES if max_bytes is None else max_bytes
    groups: list[dict[str, Item]] = []
    size = 0
    for unit in units:
        nbytes = sum(_nbytes(t) for t in unit.values())
        if not groups or (size + nbytes > max_bytes and groups[-1]):
            groups.append({})
            size = 0
        groups[-1].update(unit)
        size += nbytes
    if len(groups) == 1:
        write_file(folder / WEIGHTS, groups[0], _META)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for name, group in zip(names, groups, strict=True):
        write_file(folder / name, group, _META)
        weight_map.update({k: name for k in group})
        total += sum(_nbytes(t) for t in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def rewrite_tensors(folder: Path, updates: Mapping[str, torch.Tensor]) -> None:
    """Replace the named tensors of ``folder``'s weight files by ``updates`` (same names, shapes
    and dtypes); each changed file is written beside itself, then renamed over it."""
    left = dict(updates)
    for path in weight_files(folder):
        state = load_file(str(path))
        mine = [k for k in left if k in state]
        for name in mine:
            new = left.pop(name)
            if new.shape != state[name].shape or new.dtype != state[name].dtype:
                old = state[name]
                raise LowbitError(
                    f"{path.name}: {name} would change from {old.dtype} "
                    f"{tuple(old.shape)} to {new.dtype} {tuple(new.shape)}"
                )
            state[name] = new.detach().contiguous()
        if mine:
            tmp = path.with_name(path.name + ".tmp")
            write_file(tmp, state, _META)
            tmp.replace(path)
    if left:
        raise LowbitError(f"{folder}: no weight file holds {next(iter(left))}")


def write_unit_shards(
    folder: Path, units: list[list[str]], tensor: Callable[[str], torch.Tensor]
) -> None:
    """Write a float checkpoint one unit at a time, one shard per unit (with the index), making
    each tensor with ``tensor(name)`` just before its unit is written: the whole model is never
    in memory (random scale models, GGUF conversion)."""
    weight_map, total = {}, 0
    for i, names in enumerate(units):
        shard = f"model-{i + 1:05d}-of-{len(units):05d}.safetensors"
        total += write_file(folder / shard, {n: tensor(n) for n in names}, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def block_units(model: nn.Module, names: list[str]) -> list[list[str]]:
    """``names`` grouped as streamed runs write them: per decoder block, then the rest."""
    prefix, blocks = find_blocks(model)
    heads = [f"{prefix}.{i}." for i in range(len(blocks))]
    units = [[n for n in names if n.startswith(h)] for h in heads]
    inside = {n for unit in units for n in unit}
    return [*units, [n for n in names if n not in inside]]


def _nbytes(item: Item) -> int:
    return item.nbytes if isinstance(item, Entry) else item.numel() * item.element_size()


def write_extras(folder: Path, model: nn.Module, tokenizer: Any = None) -> None:
    """config.json (marked as lowbit's), generation config and tokenizer files."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        _save_config(config, folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest, last, with the size and sha256 of every weight file (``inspect --verify``
    checks them)."""
    files = file_hashes(folder, [p.name for p in weight_files(folder)])
    body = {"format": "lowbit", "manifest_version": MANIFEST_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(body, indent=1, default=str), encoding="utf-8")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a lowbit folder: its shards (from the index) or the one file."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        return [folder / WEIGHTS]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"{index} is not a valid shard index: {exc}") from None
    files = [folder / n for n in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise LowbitError(f"{index} lists shard {path.name}, which is missing")
    return files


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LowbitError(f"{folder} is not a lowbit folder (no {MANIFEST})") from None
    except ValueError as exc:
        raise LowbitError(f"{path} is not valid JSON: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "lowbit"
        or ("layers" not in manifest or not isinstance(manifest.get("manifest_version", 0), int))
    ):
        raise LowbitError(f"{path} is not a lowbit manifest")
    if manifest.get("manifest_version", 0) > MANIFEST_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit; upgrade lowbit to read it")
    _check_fields(manifest, path)
    return manifest


_FIELD_TYPES = {"layers": dict, "files": dict, "blocks": list, "metrics": dict, "canary": dict,
                "source": dict, "recipe": dict}  # fmt: skip
_NUMBERS = ("kl", "top1", "tolerance", "tolerance_psnr", "psnr", "ppl", "mean_kl", "top1_rate")


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    """The fields lowbit reads are of the types it reads them as; a manifest edited by hand (or
    damaged) is one line naming the field, not a traceback where it is used."""

    def bad(field: str, expected: str) -> LowbitError:
        return LowbitError(f"{path}: {field} must be {expected}; the manifest was edited or "
                           f"damaged (quantize again, or restore it)")  # fmt: skip

    for key, kind in _FIELD_TYPES.items():
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise bad(key, "a mapping" if kind is dict else "a list")
    for name, info in (manifest.get("files") or {}).items():
        if not isinstance(info, dict):
            raise bad(f"files.{name}", "a mapping of bytes and sha256")
    for i, block in enumerate(manifest.get("blocks") or []):
        if not isinstance(block, dict) or "block" not in block:
            raise bad(f"blocks[{i}]", "a mapping with its block's name")
    sections = {"canary": manifest.get("canary") or {}}
    sections |= {f"metrics.{k}": v for k, v in (manifest.get("metrics") or {}).items()
                 if isinstance(v, dict)}  # fmt: skip
    for where, section in sections.items():
        for key in _NUMBERS:
            value = section.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise bad(f"{where}.{key}", "a number")
    canary = sections["canary"]
    needed = ("tolerance_psnr", "output_range") if canary.get("kind") == "image" else ("tolerance",)
    missing = [key for key in needed if canary and key not in canary]
    if missing:
        raise bad(f"canary.{missing[0]}", "present")


def load_folder(
    folder: Path,
    skeleton: nn.Module | None = None,
    prepare: Callable[[nn.Module, dict], None] | None = None,
) -> tuple[nn.Module, dict]:
    """(model, manifest) from a lowbit folder; ``skeleton`` for models that are not HF ones.

    The saved tensors are read from the shards' memory maps without a copy. ``prepare(model,
    manifest)`` runs while they are (the conversion to kernel layouts, which copies what it
    keeps); after it, every tensor of the model is moved into one block of memory on huge pages
    (:func:`lowbit.models.arena.move_into_arena`, faster to stream at decode), which also lets
    the maps go: a map holds every page read through it for as long as one tensor reads it,
    which kept a second copy of the converted weights resident. Without ``prepare`` the model
    keeps reading the maps (one copy, in the page cache).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    plans = manifest_layers(manifest)
    files = weight_files(folder)
    header: dict[str, Entry] = {}
    for path in files:  # a truncated or damaged shard is an error naming it
        header.update(read_header(path)[0])
    check_tensors(plans, header)
    model = skeleton if skeleton is not None else hf_skeleton(folder)
    for name, plan in plans.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{MANIFEST}: layer {name} is not in the model that "
                              f"config.json describes") from None  # fmt: skip
        set_module(model, name, plan.build())
    spec = attention_spec(manifest)
    if spec is not None and spec.center_keys:  # the measured key centres are saved tensors
        add_key_centers(model)
    unexpected, loaded = [], set()
    state = result = None
    for path in files:
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise LowbitError(f"cannot read {path}: {exc}") from None
        try:
            result = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise LowbitError(f"{path.name} disagrees with {MANIFEST}: {first[:200]}") from None
        unexpected += result.unexpected_keys
        loaded |= set(state)
    if unexpected:
        raise LowbitError(f"the weights have tensors the model lacks: {unexpected[:3]}")
    if skeleton is not None:  # a built (not meta) skeleton: a tensor not on disk stays random
        missing = [k for k in model.state_dict() if k not in loaded]
        if missing:
            raise LowbitError(f"{WEIGHTS} is missing tensors: {missing[:3]}")
    _float32_outside(model)
    rotate = (manifest.get("recipe") or {}).get("rotate")
    if rotate is not None:  # the inputs its weights expect turned at run time
        install_online_rotations(model, from_mapping(RotateOptions, rotate, "recipe.rotate"))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise LowbitError(f"{WEIGHTS} is missing tensors: {empty[:3]}")
    if prepare is not None:
        prepare(model, manifest)
        del state, result  # (the last shard's tensors, as read)
        move_into_arena(model)
        _check_let_go(files)
    return model.eval(), manifest


def _check_let_go(files: list[Path]) -> None:
    """Warn where a shard is still mapped after the move into the arena (a tensor it missed, held
    where it does not look: its pages would stay counted against the process). Linux only."""
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:
        return
    kept = [p.name for p in files if str(p.resolve()) in mapped]
    if kept:
        log.warning("%s still mapped after loading: a tensor read from it is held somewhere "
                    "the move into one block does not look", ", ".join(kept))  # fmt: skip


def _float32_outside(model: nn.Module) -> None:
    """Float tensors outside the quantized layers compute in float32 (a streamed run keeps
    embeddings in the source's dtype on disk)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for key, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                module._parameters[key] = nn.Parameter(p.float(), requires_grad=False)


def _save_config(config: Any, folder: Path) -> None:
    """config.json of the source model, marked so plain transformers refuses it clearly
    (it cannot read lowbit's packed tensors; export to compressed-tensors for that)."""
    data = config.to_dict()
    data["quantization_config"] = {"quant_method": "lowbit", "see": MANIFEST}
    (folder / "config.json").write_text(
        json.dumps(data, indent=2, sort_keys=True), encoding="utf-8"
    )


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

"""Quantize a float checkpoint straight into a lowbit folder, one decoder block in memory at a
time (``lowbit quantize``): resumable work folder, rotations, canary, tuning before publishing,
the manifest; under torchrun every rank calibrates and rank 0 writes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import __version__
from lowbit.assets import prepare_out
from lowbit.calibration import CalibrationSet
from lowbit.calibration.canary import CanaryProbe
from lowbit.calibration.group import Group
from lowbit.errors import LowbitError
from lowbit.eval.canary import Canary, model_canary_tokens, model_logits
from lowbit.eval.canary import measure as measure_canary
from lowbit.eval.canary import write as write_canary
from lowbit.eval.size import SizeReport
from lowbit.models.checkpoint import write_extras, write_manifest
from lowbit.models.load import source_folder, source_tokenizer
from lowbit.models.normalize import conv1d_to_linear
from lowbit.models.rotate import Rotator, fitted_rotation, install_online_rotations
from lowbit.models.rotate_source import RotatedSource
from lowbit.models.source import TensorSource, skeleton, untie_head
from lowbit.models.workdir import WorkFolder, drop_published, work_path
from lowbit.nn.attention import check_attention
from lowbit.pipeline.estimate import disk_bytes
from lowbit.pipeline.manifest import build_manifest
from lowbit.pipeline.plan import plan_model
from lowbit.pipeline.report import QuantizeReport
from lowbit.pipeline.spin import streamed_matrix
from lowbit.pipeline.stream import stream_quantize
from lowbit.pipeline.tune import check_tune, tune_folder
from lowbit.recipes import Recipe, load_recipe


def quantize_to(
    source: str,
    recipe: Recipe | str | Path,
    out: str | Path,
    calibration: CalibrationSet | None = None,
    seed: int = 0,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    analysis: dict[str, Any] | None = None,
    hidden_dtype: str = "float32",
    spill: bool = False,
    canary: bool = True,
) -> tuple[Path, QuantizeReport]:
    """Quantize the float model ``source`` (zoo name, HF folder, GGUF file, hub id) straight
    into the lowbit folder ``out``, one decoder block in memory at a time. A killed run started
    again with the same arguments resumes from its first unfinished block (``restart``
    discards that work instead). ``hidden_dtype="bfloat16"`` halves the memory of the
    calibration hidden states carried between blocks; ``spill`` keeps them on disk in the work
    folder (exact, one batch in memory at a time). With ``canary`` the float model's answers
    on a few fixed windows and the quantized model's distance to them are recorded
    (:mod:`lowbit.eval.canary`; checked later by ``lowbit monitor`` and ``lowbit serve``)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    group = Group.current()
    if group.main:
        drop_published(out)  # a run stopped right after it published out
    prepare_out(out, overwrite)
    folder, kind = source_folder(source)
    model = skeleton(folder)
    tensors = TensorSource(folder)
    tensors.check(model)
    recipe = dataclasses.replace(recipe, rotate=fitted_rotation(recipe.rotate, model))
    rotator = None
    if recipe.rotate is not None:  # checked before any work (a learned matrix: trained below)
        rotator = Rotator(model, recipe.rotate)
    conv1d_to_linear(model)
    plan = plan_model(recipe, model, warn=False)[1]  # before any work
    check_tune(recipe, plan, calibration)
    if recipe.attention is not None:  # not only once a learned rotation has trained
        check_attention(model, recipe.attention)
    fingerprint = {"model": _identity(folder, tensors), "recipe": recipe.to_dict(),
                   "calibration": calibration.describe() if calibration else None,
                   "seed": seed, "lowbit": __version__, "hidden_dtype": hidden_dtype,
                   "canary": canary}  # fmt: skip
    if group.distributed:  # a resumed job needs the same ranks holding the same batches
        fingerprint["world_size"] = group.world
    # every rank must run the same job; where each host keeps the model may differ
    group.check_same({**fingerprint, "model": _content(fingerprint["model"])})
    if group.main:
        _check_disk(out, disk_bytes(folder, model, tensors, recipe, plan, calibration,
                                    parse_hidden_dtype(hidden_dtype)))  # fmt: skip
    work = _work_folder(out, fingerprint, restart, group)
    try:
        if rotator is not None:  # each tensor rotated as it is read; the head untied
            learned = streamed_matrix(folder, tensors, recipe, calibration, work, group,
                                      progress)  # fmt: skip
            if learned is not None:
                rotator.q, rotator.heads = learned
            untie_head(model)
            install_online_rotations(model, recipe.rotate)
            tensors = RotatedSource(tensors, rotator)
        dtype = parse_hidden_dtype(hidden_dtype)
        tokenizer = source_tokenizer(folder)
        probe = _canary_probe(model, tokenizer) if canary and group.main else None
        report, units = stream_quantize(model, tensors, recipe, calibration, work, progress,
                                        seed, dtype, spill, group, probe)  # fmt: skip
    except BaseException:
        work.discard_if_unused()  # a run refused before its first block leaves nothing behind
        raise
    found = _canary_found(probe)  # reduced to top-k before the shards are assembled
    del probe
    report.analysis = analysis
    peaks = group.ordered_sum({group.rank: report.peak_rss_mb or 0.0}, group.world)
    if not group.main:  # rank 0 writes the folder; the others drop their work once it exists
        if not group.min_int(1):
            raise LowbitError("rank 0 could not write the folder (see its error); this rank's "
                              "work is kept: the same command resumes")  # fmt: skip
        work.remove()
        return out, report
    size = _streamed_size(report, work.units(units))
    manifest = build_manifest(report, {"model": source, "kind": kind}, size, None, seed)
    manifest["processes"] = {**group.describe(), "peak_rss_mb": [round(p, 1) for p in peaks]}

    def extras(final: Path) -> None:
        write_extras(final, model, tokenizer)
        canary = found
        if recipe.tune is not None:  # the assembled folder, tuned before it is published
            write_manifest(final, manifest)  # what loading it reads
            manifest["tune"], tuned = tune_folder(final, folder, recipe.tune, calibration,
                                                  progress)  # fmt: skip
            peak = manifest["tune"]["peak_rss_mb"] or 0.0  # this process's, tuning included
            manifest["quantize_peak_rss_mb"] = max(manifest["quantize_peak_rss_mb"] or 0.0, peak)
            report.seconds += manifest["tune"]["seconds"]  # as lowbit.quantize counts it
            manifest["quantize_seconds"] = round(report.seconds, 3)
            if found is not None:  # the canary records the tuned model
                canary = found[0], measure_canary(found[0], model_logits(tuned, found[0].tokens))
        if canary is not None:
            manifest["canary"] = write_canary(*canary, final)
        write_manifest(final, manifest)

    written = False
    try:
        final = work.finish(units, overwrite, extras)
        written = True
        return final, report
    finally:
        group.min_int(int(written))  # tells the other ranks whether to drop their work


def _canary_probe(model: nn.Module, tokenizer: Any) -> CanaryProbe:
    return CanaryProbe(model_canary_tokens(model, tokenizer))


def _canary_found(probe: CanaryProbe | None) -> tuple[Canary, dict[str, Any]] | None:
    if probe is None:
        return None
    canary = Canary.from_logits(probe.tokens, probe.float_logits)
    return canary, measure_canary(canary, probe.quantized_logits)


def _work_folder(out: Path, fingerprint: dict[str, Any], restart: bool, group: Group) -> WorkFolder:
    """Rank 0's work folder first (``restart`` clears every rank's on its host), then the
    others' (each keeps the inputs of two blocks, see :class:`WorkFolder`)."""
    keep = 2 if group.distributed else 1
    work = WorkFolder(out, fingerprint, restart, keep=keep) if group.main else None
    group.barrier()
    return work or WorkFolder(out, fingerprint, restart, rank=group.rank, keep=keep)


def _check_disk(out: Path, needed: int) -> None:
    """Refuse, before any work, a run whose work folder and output will not fit on the disk
    beside ``out`` (what a resumed run's work folder already holds counts as written)."""
    work = work_path(out)
    held = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
    where = out.absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed - held > free:
        raise LowbitError(f"this run needs about {(needed - held) / 1e9:,.1f} GB more disk beside "
                          f"--out (its work folder, then the assembled folder), and "
                          f"{free / 1e9:,.1f} GB are free there: free some space or choose "
                          f"--out on a larger disk")  # fmt: skip


def parse_hidden_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16"):
        raise LowbitError(f"hidden states are kept in float32 or bfloat16, not {name!r}")
    return getattr(torch, name)


def _identity(folder: Path, tensors: TensorSource) -> dict[str, Any]:
    """What identifies a source checkpoint without hashing its bytes: its files and sizes."""
    files = sorted({e.path for e in tensors.entries.values()})
    config = (folder / "config.json").read_text(encoding="utf-8")
    return {"folder": str(folder.resolve()), "config": config,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}  # fmt: skip


def _content(identity: dict[str, Any]) -> dict[str, Any]:
    """What of a source's identity names its content, not where a host keeps it."""
    return {"config": identity["config"], "files": [f[:2] for f in identity["files"]]}


def _streamed_size(report: QuantizeReport, units: list[dict]) -> SizeReport:
    """The size of a streamed model from its report and the written units' headers."""
    layers = report.layers.values()
    weights = sum(r.in_features * r.out_features for r in layers)
    qbytes = sum(round(r.bits_per_weight * r.in_features * r.out_features / 8) for r in layers)
    total = sum(e.nbytes for unit in units for e in unit.values())
    return SizeReport(weights, qbytes, total - qbytes, total)

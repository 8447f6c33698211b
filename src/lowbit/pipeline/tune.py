"""The end-to-end tuning step (recipe block ``tune``): after every layer is quantized, train the
packed layers' scales and offsets through the whole model towards the float model's outputs
(:mod:`lowbit.algorithms.tune`), codes fixed, then pack them again.

In memory (:func:`tune_model`) the teacher is a float copy kept before quantization; a streamed
run (:func:`tune_folder`) tunes the assembled folder before it is published, with the float
model read whole from its source (both models are in memory for the training, as for a learned
rotation: ``lowbit quantize --dry-run`` says so). Only the scale and offset tensors are
rewritten, in place in the unpublished folder, so every other byte is what the blocks wrote.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.lkd import trainable
from lowbit.algorithms.tune import TuneOptions, tune_end_to_end
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.models.checkpoint import load_folder, rewrite_tensors
from lowbit.models.modules import forward_logits, set_module
from lowbit.models.source import TensorSource, materialize, release, skeleton
from lowbit.nn import QuantLinear
from lowbit.nn.attention import attention_spec, install_attention
from lowbit.nn.fake_linear import FakeQuantLinear
from lowbit.recipes import Recipe
from lowbit.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)


def tunable(layer: nn.Module) -> bool:
    """Packed linears (not convolutions) on integer grids with float offsets (or none), no LoRC
    factors, no static input ranges."""
    if type(layer) is not QuantLinear:
        return False
    act = layer.act
    return _tunable_spec(layer.spec) and not (act is not None and act.static)


def check_tune(recipe: Recipe, plan: dict[str, WeightSpec],
               calibration: CalibrationSet | None) -> None:  # fmt: skip
    """What ``recipe.tune`` needs, checked before any quantization work: calibration windows
    enough, and some planned layer it can tune."""
    if recipe.tune is None:
        return
    if calibration is None:
        raise LowbitError("tune trains on calibration text; give calibration windows (--calib)")
    recipe.tune.check_windows(len(calibration.windows))
    if not any(_tunable_spec(spec) for spec in plan.values()):
        raise LowbitError("tune: no planned layer it can tune (integer grids with float "
                          "offsets, no LoRC); drop tune")  # fmt: skip


def _tunable_spec(spec: WeightSpec) -> bool:
    offsets = spec.symmetric or spec.zero_point == "float"
    return spec.qtype.kind == "int" and offsets and not spec.lorc_rank


def tune_model(
    model: nn.Module,
    teacher: nn.Module,
    options: TuneOptions,
    calibration: CalibrationSet | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune ``model``'s packed layers in place towards ``teacher`` (the float model; any
    rotation folded into ``model`` leaves its outputs unchanged) on ``calibration``; returns
    the manifest's ``tune`` record."""
    if calibration is None:
        raise LowbitError("tune trains on calibration text; give calibration windows (--calib)")
    start = time.perf_counter()
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    chosen = [n for n, m in model.named_modules() if tunable(m)]
    if not chosen:
        raise LowbitError("tune: no quantized layer it can tune (integer grids with float "
                          "offsets, no LoRC, no static input ranges); drop tune")  # fmt: skip
    if len(chosen) < len(layers):
        log.info("tune: %d of %d quantized layers kept as they are (their grids have no "
                 "trainable scales here)", len(layers) - len(chosen), len(layers))  # fmt: skip
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    fakes = {}
    for name in chosen:  # one layer at a time: its packed buffers go as its twin comes
        fakes[name] = _twin(name, model.get_submodule(name))
        set_module(model, name, fakes[name])
    groups = trainable(list(fakes.values()), "scales", options.lr)
    model.eval()  # no dropout; gradients still flow
    try:
        record = tune_end_to_end(groups, lambda ids: forward_logits(model, ids),
                                 lambda ids: forward_logits(teacher, ids), calibration.windows,
                                 options, progress)  # fmt: skip
    finally:  # the packed layers back, holding the tuned (or, after an error, the start) grids
        with torch.no_grad():
            for name, fake in fakes.items():
                packed = QuantLinear.from_quantized(fake.to_quantized(), fake.bias, name, fake.act)
                set_module(model, name, packed.eval())
        for p, flag in grads.items():
            p.requires_grad_(flag)
    log.info("tune: held-out KL %.4f -> %.4f", record["held_out_kl_before"],
             record["held_out_kl_after"])  # fmt: skip
    return {"layers": len(fakes), "steps": options.steps, "batch_size": options.batch_size,
            "lr": options.lr, "holdout": options.holdout, **record,
            "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def tune_folder(
    folder: Path,
    source: Path,
    options: TuneOptions,
    calibration: CalibrationSet | None,
    progress: bool = True,
) -> tuple[dict, nn.Module]:
    """Tune the lowbit folder ``folder`` (assembled, not yet published) against the float
    model in ``source`` and rewrite its scale and offset tensors in place; returns the record
    and the tuned model (for the canary)."""
    model, manifest = load_folder(folder)
    spec = attention_spec(manifest)
    if spec is not None:  # the key/value cache the model computes with, as loading installs it
        install_attention(model, spec)
    teacher = skeleton(source)
    tensors = TensorSource(source)
    tensors.check(teacher)  # (and reads names saved without the model's prefix)
    log.info("tune: the float model is held in memory while the scales are trained")
    materialize(teacher, list(teacher.state_dict()), tensors)  # what the model has
    teacher.eval()
    try:
        record = tune_model(model, teacher, options, calibration, progress)
    finally:
        release(teacher)
    updates = {}
    for name, module in model.named_modules():
        if tunable(module):
            updates[f"{name}.scale"] = module.scale
            if module.zero is not None:
                updates[f"{name}.zero"] = module.zero
    rewrite_tensors(folder, updates)
    return record, model


def _twin(name: str, layer: QuantLinear) -> FakeQuantLinear:
    """A FakeQuantLinear holding ``layer``'s codes fixed, its scales and offsets trainable."""
    linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                bias=layer.bias is not None)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(layer.dequantized_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return FakeQuantLinear.with_fixed_codes(linear, layer.quantized_weight(), name, layer.act)


__all__ = ["check_tune", "tunable", "tune_folder", "tune_model"]

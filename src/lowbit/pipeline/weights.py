"""Apply a recipe to a model: plan the layers, quantize each, swap in packed QuantLinear modules.

RTN and HQQ need no data and go layer by layer. GPTQ, AWQ and AWQ+GPTQ go block by block through
the sequential runner on calibration windows; linears outside the decoder blocks (an untied
``lm_head`` the recipe asks for) are then quantized with RTN.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import rtn, with_lorc
from lowbit.algorithms.kmeans import kmeans
from lowbit.calibration import BlockContext, BlockResult, CalibrationSet, run_sequential
from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.models.families import families, family_of, find_blocks, sequential_groups
from lowbit.models.modules import quantizable_layers, set_module, untie_if_needed
from lowbit.models.normalize import conv1d_to_linear
from lowbit.nn import QuantLinear
from lowbit.pipeline.calibrated import (
    awq_scale_block,
    clipped_rtn_block,
    gptq_fit,
    hessian_block,
    kmeans_fit,
)
from lowbit.primitives import QuantizedWeight, sqnr_db
from lowbit.recipes import Recipe, plan_layers
from lowbit.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)

CALIBRATED = ("gptq", "awq", "awq+gptq")
CALIBRATION_OPTIONAL = ("kmeans",)  # weighted by calibration data when given, else uniform


@dataclass
class LayerReport:
    spec: WeightSpec
    in_features: int
    out_features: int
    bias: bool
    bits_per_weight: float
    weight_sqnr_db: float
    activations: ActivationSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.spec.to_dict(),
            "format": self.spec.short(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "bits_per_weight": round(self.bits_per_weight, 6),
            "weight_sqnr_db": round(self.weight_sqnr_db, 3),
            "activations": None if self.activations is None else self.activations.to_dict(),
        }


@dataclass
class QuantizeReport:
    """What was done: per-layer formats and diagnostics, per-block errors, the wall time."""

    recipe: Recipe
    layers: dict[str, LayerReport] = field(default_factory=dict)
    blocks: list[BlockResult] = field(default_factory=list)
    awq_alpha: dict[str, float | None] = field(default_factory=dict)
    qat: dict[str, Any] | None = None  # training options and losses, for QAT-packed models
    calibration: CalibrationSet | None = None
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # of the whole process, at the end of quantization


@torch.no_grad()
def quantize_weights(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> QuantizeReport:
    """Quantize ``model`` in place according to ``recipe``; returns the report."""
    start = time.perf_counter()
    conv1d_to_linear(model)
    layers = quantizable_layers(model)
    plan = plan_layers(recipe, layers)
    originals = {name: module.weight.detach().clone() for name, module in layers if name in plan}
    report = QuantizeReport(recipe, calibration=calibration)
    if recipe.algorithm in CALIBRATED and calibration is None:
        raise LowbitError(f"algorithm {recipe.algorithm} needs calibration data (--calib)")
    if calibration is not None and recipe.algorithm in CALIBRATED + CALIBRATION_OPTIONAL:
        results = _calibrated(model, recipe, plan, calibration, report, progress, batch_size)
    else:
        results = {}
    rest = {n: s for n, s in plan.items() if n not in results}
    modules = dict(layers)
    bar = tqdm(rest.items(), desc=f"quantize ({_rtn_name(recipe)})", unit="layer",
               disable=not progress or not rest)  # fmt: skip
    for name, spec in bar:
        weight, spec = modules[name].weight, _layer_spec(recipe, spec)
        qw = (
            kmeans(weight, spec, None, name)
            if recipe.algorithm == "kmeans"
            else rtn(weight, spec, name)
        )
        results[name] = with_lorc(qw, weight)
    for name, module in layers:
        if name in results:
            _swap(model, name, module, results[name], originals[name], report)
    untie_if_needed(model, set(plan))
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    log.info("quantized %d layers in %.1f s", len(plan), report.seconds)
    return report


def _rtn_name(recipe: Recipe) -> str:
    return recipe.algorithm if recipe.algorithm in ("hqq", "kmeans") else "rtn"


def _layer_spec(recipe: Recipe, spec: WeightSpec) -> WeightSpec:
    """HQQ is round-to-nearest with the HQQ range optimiser as the observer; K-means stores a
    codebook of the spec's width and blocks instead of a uniform grid."""
    if recipe.algorithm == "hqq":
        return spec.replace(observer=dataclasses.replace(spec.observer, name="hqq"))
    if recipe.algorithm == "kmeans" and spec.format != "kmeans":
        if spec.format != "int":
            raise LowbitError(f"algorithm kmeans fits integer-width codebooks, not {spec.format}")
        return spec.replace(format="kmeans", symmetric=True, zero_point="float")
    return spec


def _swap(model, name, module, qw: QuantizedWeight, original, report: QuantizeReport) -> None:
    act = report.recipe.activations
    new = QuantLinear.from_quantized(qw, module.bias, name, act)
    report.layers[name] = LayerReport(
        qw.spec, module.in_features, module.out_features, module.bias is not None,
        new.bits_per_weight(), sqnr_db(original, qw.dequantize()), act,
    )  # fmt: skip
    set_module(model, name, new.to(original.device))


def _calibrated(model, recipe, plan, calibration, report, progress, batch_size):
    prefix, blocks = find_blocks(model)
    family = family_of(model)
    if recipe.algorithm.startswith("awq") and family is None:
        known = ", ".join(f.name for f in families())
        raise LowbitError(
            f"AWQ needs to know which module feeds which linears; "
            f"{getattr(model.config, 'model_type', type(model).__name__)} is not a known family "
            f"({known}); use gptq or hqq"
        )
    results: dict[str, QuantizedWeight] = {}

    def handler(ctx: BlockContext) -> None:
        local = {n[len(ctx.name) + 1 :]: s for n, s in plan.items() if n.startswith(ctx.name + ".")}
        local = {n: _layer_spec(recipe, s) for n, s in local.items()}
        if not local:
            return
        groups = sequential_groups(model, ctx.block, recipe.gptq.true_sequential)
        if recipe.algorithm.startswith("awq"):
            report.awq_alpha.update(awq_scale_block(ctx, local, family, recipe.awq, batch_size))
        if recipe.algorithm == "kmeans":
            hessian_block(ctx, local, groups, kmeans_fit, results)
        elif recipe.algorithm in ("gptq", "awq+gptq"):
            hessian_block(ctx, local, groups, gptq_fit(recipe.gptq), results)
        else:
            clipped_rtn_block(ctx, local, groups, recipe.awq, results)

    report.blocks = run_sequential(
        model, blocks, prefix, calibration.windows, handler, batch_size, progress,
        desc=f"quantize ({recipe.algorithm})",
    )  # fmt: skip
    return results

"""Apply a recipe to a model: plan the layers, quantize each, swap in packed QuantLinear modules.

RTN and HQQ need no data and go layer by layer. GPTQ, AWQ and AWQ+GPTQ go block by block through
the sequential runner on calibration windows, and so does every recipe with ``smoothquant`` or
``lkd``: per block, SmoothQuant factors are folded in, the weight algorithm quantizes the block,
and LKD trains it towards the float block's outputs. Linears outside the decoder blocks (an untied
``lm_head`` the recipe asks for) are then quantized with RTN. Static activation ranges are
calibrated last, on the whole quantized model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from lowbit.pipeline.act_ranges import calibrate_activations
from lowbit.pipeline.calibrated import (
    awq_scale_block,
    clipped_rtn_block,
    gptq_fit,
    hessian_block,
    kmeans_fit,
    smooth_block,
)
from lowbit.pipeline.diagnostics import output_sqnr
from lowbit.pipeline.lkd import lkd_block
from lowbit.primitives import QuantizedWeight, sqnr_db
from lowbit.recipes import Recipe, plan_layers
from lowbit.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)

CALIBRATED = ("gptq", "awq", "awq+gptq")
CALIBRATION_OPTIONAL = ("kmeans",)  # weighted by calibration data when given, else uniform
DIAGNOSTIC_WINDOWS = 4  # calibration windows the per-layer output SQNR is measured on


@dataclass
class LayerReport:
    spec: WeightSpec
    in_features: int
    out_features: int
    bias: bool
    bits_per_weight: float
    weight_sqnr_db: float
    activations: ActivationSpec | None = None
    output_sqnr_db: float | None = None  # on calibration data, when there is some

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.spec.to_dict(),
            "format": self.spec.short(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "bits_per_weight": round(self.bits_per_weight, 6),
            "weight_sqnr_db": round(self.weight_sqnr_db, 3),
            "output_sqnr_db": _rounded(self.output_sqnr_db),
            "activations": None if self.activations is None else self.activations.to_dict(),
        }


def _rounded(x: float | None) -> float | str | None:
    """JSON-safe: finite values rounded, infinities as strings."""
    if x is None or math.isfinite(x):
        return None if x is None else round(x, 3)
    return "inf" if x > 0 else "-inf"


@dataclass
class QuantizeReport:
    """What was done: per-layer formats and diagnostics, per-block errors, the wall time."""

    recipe: Recipe
    layers: dict[str, LayerReport] = field(default_factory=dict)
    blocks: list[BlockResult] = field(default_factory=list)
    awq_alpha: dict[str, float | None] = field(default_factory=dict)
    smooth_alpha: dict[str, float | None] = field(default_factory=dict)
    lkd: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> loss before/after
    qat: dict[str, Any] | None = None  # training options and losses, for QAT-packed models
    analysis: dict[str, Any] | None = None  # bit allocation summary, for mixed recipes
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
    for name, module in layers:
        if name in plan and not torch.isfinite(module.weight).all():
            raise LowbitError(f"{name}: the weight holds NaN or inf values; fix or exclude the "
                              f"layer (ignore: [{name}]) before quantizing")  # fmt: skip
    originals = {name: module.weight.detach().clone() for name, module in layers if name in plan}
    report = QuantizeReport(recipe, calibration=calibration)
    if recipe.needs_calibration and calibration is None:
        raise LowbitError(f"this recipe needs calibration data (--calib): "
                          f"{_calibration_reason(recipe)}")  # fmt: skip
    if calibration is not None and _sequential(recipe):
        results = _calibrated(model, recipe, plan, calibration, report, progress, batch_size,
                              originals)  # fmt: skip
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
    if recipe.activations is not None and recipe.activations.static:
        calibrate_activations(model, calibration.windows, batch_size, progress=progress)
    if calibration is not None:
        sample = calibration.windows[:DIAGNOSTIC_WINDOWS]
        for name, db in output_sqnr(model, originals, sample, batch_size).items():
            report.layers[name].output_sqnr_db = db
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    log.info("quantized %d layers in %.1f s", len(plan), report.seconds)
    return report


def _sequential(recipe: Recipe) -> bool:
    """Whether the recipe goes block by block through the sequential runner."""
    steps = recipe.smoothquant is not None or recipe.lkd is not None
    return steps or recipe.algorithm in CALIBRATED + CALIBRATION_OPTIONAL


def _calibration_reason(recipe: Recipe) -> str:
    if recipe.algorithm in CALIBRATED:
        return f"algorithm {recipe.algorithm}"
    steps = [k for k in ("smoothquant", "lkd") if getattr(recipe, k) is not None]
    return ", ".join(steps) or "static activation ranges"


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
    params = [t for t in (qw.qparams.scale, qw.qparams.zero) if t is not None]
    if not all(torch.isfinite(t.float()).all() for t in params):
        raise LowbitError(f"{name}: quantization produced NaN or inf scales or zeros")
    new = QuantLinear.from_quantized(qw, module.bias, name, act)
    report.layers[name] = LayerReport(
        qw.spec, module.in_features, module.out_features, module.bias is not None,
        new.bits_per_weight(), sqnr_db(original, qw.dequantize()), act,
    )  # fmt: skip
    set_module(model, name, new.to(original.device))


def _calibrated(model, recipe, plan, calibration, report, progress, batch_size, originals):
    """Quantize the decoder blocks through the sequential runner. ``originals`` is updated with
    each layer's float weight after SmoothQuant / AWQ scaling: the weight the quantized one
    stands for (for the SQNR diagnostics)."""
    prefix, blocks = find_blocks(model)
    family = family_of(model)
    scaled = recipe.algorithm.startswith("awq") or recipe.smoothquant is not None
    if scaled and family is None:
        known = ", ".join(f.name for f in families())
        raise LowbitError(
            f"AWQ and SmoothQuant need to know which module feeds which linears; "
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
        targets = ctx.outputs() if recipe.lkd is not None else None  # the float block's outputs
        if recipe.smoothquant is not None:
            report.smooth_alpha.update(
                smooth_block(ctx, local, family, recipe.activations, recipe.smoothquant)
            )
        if recipe.algorithm.startswith("awq"):
            report.awq_alpha.update(awq_scale_block(ctx, local, family, recipe.awq, batch_size))
        for n in local:
            originals[f"{ctx.name}.{n}"] = ctx.linear(n).weight.detach().clone()
        if recipe.algorithm == "kmeans":
            hessian_block(ctx, local, groups, kmeans_fit, results)
        elif recipe.algorithm in ("gptq", "awq+gptq"):
            hessian_block(ctx, local, groups, gptq_fit(recipe.gptq), results)
        elif recipe.algorithm.startswith("awq"):
            clipped_rtn_block(ctx, local, groups, recipe.awq, results)
        else:  # rtn / hqq inside the runner (for smoothquant or lkd): no clipping search
            plain = dataclasses.replace(recipe.awq, clip=False)
            clipped_rtn_block(ctx, local, groups, plain, results)
        if recipe.lkd is not None:
            losses = lkd_block(ctx, targets, results, recipe.activations, recipe.lkd, progress)
            report.lkd[ctx.name] = losses

    if recipe.lkd is not None:  # one calibration call per LKD step
        batch_size = recipe.lkd.batch_size
    steps = "+".join(k for k in ("smoothquant", "lkd") if getattr(recipe, k) is not None)
    report.blocks = run_sequential(
        model, blocks, prefix, calibration.windows, handler, batch_size, progress,
        desc=f"quantize ({recipe.algorithm}{'+' + steps if steps else ''})",
    )  # fmt: skip
    return results

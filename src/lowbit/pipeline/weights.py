"""Apply a recipe to a model: plan the layers, quantize each, swap in packed QuantLinear modules.

This is the path every weight algorithm goes through: RTN here needs no calibration data; the
calibrated algorithms plug into the same loop through the sequential block runner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import rtn
from lowbit.errors import LowbitError
from lowbit.formats.spec import WeightSpec
from lowbit.models.modules import quantizable_layers, set_module, untie_if_needed
from lowbit.nn import QuantLinear
from lowbit.primitives import sqnr_db
from lowbit.recipes import Recipe, plan_layers

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    spec: WeightSpec
    in_features: int
    out_features: int
    bias: bool
    bits_per_weight: float
    weight_sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.spec.to_dict(),
            "format": self.spec.short(),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "bits_per_weight": round(self.bits_per_weight, 6),
            "weight_sqnr_db": round(self.weight_sqnr_db, 3),
        }


@dataclass
class QuantizeReport:
    """What was done: per-layer formats and diagnostics, and the wall time."""

    recipe: Recipe
    layers: dict[str, LayerReport] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def quantize_weights(model: nn.Module, recipe: Recipe, progress: bool = True) -> QuantizeReport:
    """Quantize ``model`` in place according to ``recipe``; returns the report."""
    start = time.perf_counter()
    layers = quantizable_layers(model)
    plan = plan_layers(recipe, layers)
    modules = dict(layers)
    report = QuantizeReport(recipe)
    bar = tqdm(
        plan.items(), desc=f"quantize ({recipe.algorithm})", unit="layer", disable=not progress
    )
    for name, spec in bar:
        module = modules[name]
        if module.weight.is_meta:
            raise LowbitError(f"layer {name} has no weight data (meta tensor)")
        qw = rtn(module.weight, spec, name)
        new = QuantLinear.from_quantized(qw, module.bias, name)
        sqnr = sqnr_db(module.weight, qw.dequantize())
        report.layers[name] = LayerReport(
            spec, module.in_features, module.out_features, module.bias is not None,
            new.bits_per_weight(), sqnr,
        )  # fmt: skip
        set_module(model, name, new.to(module.weight.device))
    untie_if_needed(model, set(plan))
    report.seconds = time.perf_counter() - start
    log.info("quantized %d layers in %.1f s", len(plan), report.seconds)
    return report

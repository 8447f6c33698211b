"""What a quantization run did: per-layer formats and diagnostics, per-block errors, timings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lowbit.calibration import BlockResult, CalibrationSet
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.recipes import Recipe


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
    conv: dict[str, Any] | None = None  # a convolution's geometry (ConvGeometry.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str) -> LayerReport:
        """Inverse of :meth:`to_dict` (a manifest's or a resumed run's layer entry)."""
        acts = data.get("activations")
        return cls(
            WeightSpec.from_dict(data["weights"], f"layers.{name}.weights"),
            data["in_features"], data["out_features"], data["bias"], data["bits_per_weight"],
            _number(data["weight_sqnr_db"]),
            None if acts is None else ActivationSpec.from_dict(acts, f"layers.{name}.activations"),
            _number(data.get("output_sqnr_db")), data.get("conv"),
        )  # fmt: skip

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
            **({} if self.conv is None else {"conv": self.conv}),
        }


def _number(x: float | str | None) -> float | None:
    return None if x is None else float(x)


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
    autoround: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> RTN/learned
    qat: dict[str, Any] | None = None  # training options and losses, for QAT-packed models
    tune: dict[str, Any] | None = None  # end-to-end tuning's options and held-out KL
    analysis: dict[str, Any] | None = None  # bit allocation summary, for mixed recipes
    calibration: CalibrationSet | None = None
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # of the whole process, at the end of quantization

"""The provenance manifest a lowbit folder carries (``lowbit.json``): versions, source, recipe,
calibration, what each algorithm did, size, metrics and every layer's report."""

from __future__ import annotations

import datetime as dt
import platform
from typing import Any

import torch

from lowbit import __version__
from lowbit.eval.size import SizeReport
from lowbit.pipeline.report import QuantizeReport


def build_manifest(report: QuantizeReport, source: dict[str, str] | None, size: SizeReport,
              metrics: dict[str, Any] | None, seed: int) -> dict[str, Any]:  # fmt: skip
    return {
        "lowbit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "python_version": platform.python_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "recipe": report.recipe.to_dict(),
        "calibration": report.calibration.describe() if report.calibration else None,
        "qat": report.qat,
        "tune": report.tune,
        "seed": seed,
        "quantize_seconds": round(report.seconds, 3),
        "quantize_peak_rss_mb": round(report.peak_rss_mb or 0, 1) or None,
        "blocks": [b.to_dict() for b in report.blocks],
        "awq_alpha": report.awq_alpha or None,
        "smoothquant_alpha": report.smooth_alpha or None,
        "lkd": report.lkd or None,
        "autoround": report.autoround or None,
        "mixed_precision": report.analysis,
        "size": size.to_dict(),
        "metrics": metrics or {},
        "layers": {name: layer.to_dict() for name, layer in report.layers.items()},
    }


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__

"""Orchestration: recipes applied to models (sits above models/ and recipes/, below api)."""

from lowbit.pipeline.report import LayerReport, QuantizeReport
from lowbit.pipeline.weights import CALIBRATED, quantize_weights

__all__ = ["CALIBRATED", "LayerReport", "QuantizeReport", "quantize_weights"]

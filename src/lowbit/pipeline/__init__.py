"""Orchestration: recipes applied to models (sits above models/ and recipes/, below api)."""

from lowbit.pipeline.weights import CALIBRATED, LayerReport, QuantizeReport, quantize_weights

__all__ = ["CALIBRATED", "LayerReport", "QuantizeReport", "quantize_weights"]

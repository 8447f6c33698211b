"""Orchestration: recipes applied to models (sits above models/ and recipes/, below api)."""

from lowbit.pipeline.weights import LayerReport, QuantizeReport, quantize_weights

__all__ = ["LayerReport", "QuantizeReport", "quantize_weights"]

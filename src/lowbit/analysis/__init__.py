"""Measured per-layer analysis: sensitivity to each candidate format, automatic bit allocation
from it, and the ranking of a quantized model's layers by their share of its final KL."""

from lowbit.analysis.allocate import (
    allocate,
    allocation_recipe,
    candidate_specs,
    check_candidates,
    parse_size,
)
from lowbit.analysis.diff import image_contributions, layer_contributions
from lowbit.analysis.sensitivity import Sensitivity, measure_sensitivity

__all__ = [
    "Sensitivity",
    "allocate",
    "allocation_recipe",
    "candidate_specs",
    "check_candidates",
    "image_contributions",
    "layer_contributions",
    "measure_sensitivity",
    "parse_size",
]

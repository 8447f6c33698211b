"""Round-to-nearest (RTN): the calibration-free baseline every other algorithm must beat.

Each block's range comes from the spec's observer (min-max by default; MSE clipping or a
percentile when the recipe asks), and every weight goes to its nearest grid point.
"""

from __future__ import annotations

from torch import Tensor

from lowbit.formats.spec import WeightSpec
from lowbit.primitives import QuantizedWeight, quantize_weight


def rtn(weight: Tensor, spec: WeightSpec, layer: str = "") -> QuantizedWeight:
    """Quantize ``weight`` (out, in) to ``spec`` by rounding to nearest."""
    return quantize_weight(weight, spec, layer)

"""Pure tensor functions: ranges (observers), scales, quantize/dequantize, fake quantization."""

from lowbit.primitives.blocks import from_blocks, to_blocks
from lowbit.primitives.fake import fake_quantize, fake_quantize_weight
from lowbit.primitives.metrics import relative_error, sqnr_db
from lowbit.primitives.observers import observe
from lowbit.primitives.qparams import (
    Grid,
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize_range,
    quantize,
)
from lowbit.primitives.weight import (
    QuantizedWeight,
    dequantize_weight,
    grid_of,
    quantize_weight,
    weight_range,
)

__all__ = [
    "Grid",
    "QParams",
    "QuantizedWeight",
    "choose_qparams",
    "dequantize",
    "dequantize_weight",
    "fake_quantize",
    "fake_quantize_range",
    "fake_quantize_weight",
    "from_blocks",
    "grid_of",
    "observe",
    "quantize",
    "quantize_weight",
    "relative_error",
    "sqnr_db",
    "to_blocks",
    "weight_range",
]

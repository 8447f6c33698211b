"""Quantized modules."""

from lowbit.nn.kernel_linear import (
    QUANTIZED_MODULES,
    AffineKernelLinear,
    HalfKernelLinear,
    Int8KernelLinear,
    kernel_module,
)
from lowbit.nn.quant_conv import QuantConv
from lowbit.nn.quant_linear import QuantLinear

__all__ = [
    "QUANTIZED_MODULES",
    "AffineKernelLinear",
    "HalfKernelLinear",
    "Int8KernelLinear",
    "QuantConv",
    "QuantLinear",
    "kernel_module",
]

"""Quantized modules."""

from lowbit.nn.kernel_conv import AffineKernelConv
from lowbit.nn.kernel_linear import (
    AffineKernelLinear,
    HalfKernelLinear,
    Int8KernelLinear,
    kernel_module,
)
from lowbit.nn.kernel_tensor import Int8TensorKernel
from lowbit.nn.quant_conv import QuantConv
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.steps import select_step

QUANTIZED_MODULES = (
    QuantLinear,
    AffineKernelLinear,
    AffineKernelConv,
    HalfKernelLinear,
    Int8KernelLinear,
    Int8TensorKernel,
)
"""Modules that hold a quantized weight: they have ``storage_bytes`` and ``storage_tensors``."""

__all__ = [
    "QUANTIZED_MODULES",
    "AffineKernelConv",
    "AffineKernelLinear",
    "HalfKernelLinear",
    "Int8KernelLinear",
    "Int8TensorKernel",
    "QuantConv",
    "QuantLinear",
    "kernel_module",
    "select_step",
]

"""Float weights (float32, or float16/bfloat16 storage) times fp32 inputs, fp32 results.

The op is ``lowbit_cpu::float_linear`` (C++, see ``csrc/float_gemv.cpp``): at decode it
streams the weight once per pass (converting 16-bit weights as it reads them, so a layer held
in 16 bits reads half the bytes of a float32 one); larger inputs run torch's GEMM (16-bit
weights widened in cache-sized tiles first). :func:`float_linear_reference` defines the result
(float32 arithmetic on the exact stored values) and runs wherever the native op cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops

HALF_DTYPES = (torch.float16, torch.bfloat16)


def float_linear_reference(x: Tensor, w: Tensor) -> Tensor:
    """y = x · Wᵀ in float32 for x (..., K) and a float w (N, K)."""
    return F.linear(x.float(), w.float())


def float_linear(x: Tensor, w: Tensor) -> Tensor:
    """y = x · Wᵀ: the native op when it is available, else the reference."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and native_ops()):
        return float_linear_reference(x, w).to(x.dtype)
    lead = x.shape[:-1]
    y = torch.ops.lowbit_cpu.float_linear(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, y.shape[-1])

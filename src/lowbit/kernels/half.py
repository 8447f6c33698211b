"""16-bit float weights (float16 or bfloat16 storage) times fp32 inputs, fp32 results.

The op is ``lowbit_cpu::half_linear`` (C++, see ``csrc/half_gemv.cpp``): at decode it converts
each weight as it reads it, so a layer held in 16 bits reads half the bytes of a float32 one;
larger inputs convert cache-sized tiles and call torch's GEMM. :func:`half_linear_reference`
defines the result (float32 arithmetic on the exact 16-bit values) and runs wherever the native
op cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops

HALF_DTYPES = (torch.float16, torch.bfloat16)


def half_linear_reference(x: Tensor, w: Tensor) -> Tensor:
    """y = x · Wᵀ in float32 for x (..., K) and a 16-bit w (N, K)."""
    return F.linear(x.float(), w.float())


def half_linear(x: Tensor, w: Tensor) -> Tensor:
    """y = x · Wᵀ: the native op when it is available, else the reference."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and native_ops()):
        return half_linear_reference(x, w).to(x.dtype)
    lead = x.shape[:-1]
    y = torch.ops.lowbit_cpu.half_linear(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, y.shape[-1])

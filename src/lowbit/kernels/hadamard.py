"""The online Hadamard transform (``csrc/hadamard.cpp``) and its reference,
:func:`lowbit.primitives.hadamard.online_hadamard`, which defines the result."""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.build import native_ops
from lowbit.primitives.hadamard import online_hadamard


def hadamard_transform(x: Tensor, block: Tensor) -> Tensor:
    """x (..., n) times ``online_matrix(n)`` given its small block (p, p): the native op for
    float32 CPU tensors when the kernels are built, no gradient is asked for (the op has no
    backward) and no graph is being traced (``torch.export`` / ``torch.compile``: the
    butterflies become plain graph ops, e.g. ONNX ones), else the plain-PyTorch butterflies."""
    cpu32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, block))
    grad = torch.is_grad_enabled() and x.requires_grad
    if cpu32 and not grad and not torch.compiler.is_compiling() and native_ops():
        return torch.ops.lowbit_cpu.hadamard_transform(x.contiguous(), block.contiguous())
    return online_hadamard(x, block.to(device=x.device))

"""Swap a loaded model's quantized layers for their fast-kernel modules (once, at load time)."""

from __future__ import annotations

from torch import nn

from lowbit.models.modules import set_module
from lowbit.nn import QuantLinear, kernel_module


def use_kernels(model: nn.Module) -> dict[str, int]:
    """Swap every QuantLinear a kernel covers for its fast module; counts per kind (``reference``:
    layers left on the reference path)."""
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        fast = kernel_module(module)
        kind = "reference" if fast is None else fast.kind
        counts[kind] = counts.get(kind, 0) + 1
        if fast is not None:
            set_module(model, name, fast)
    return counts

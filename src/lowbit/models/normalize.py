"""Make every model look the same to lowbit: GPT-2-style ``Conv1D`` layers (a linear layer with
its weight stored transposed) become ``nn.Linear`` with identical outputs."""

from __future__ import annotations

import torch
from torch import nn


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D modules by equivalent nn.Linear in place; returns the count."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)  # fmt: skip
        linear.stored_transposed = True  # checkpoints hold this weight as (in, out)
        with torch.no_grad():
            if not module.weight.is_meta:
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced

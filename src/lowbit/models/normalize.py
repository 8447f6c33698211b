"""Make every model look the same to lowbit: GPT-2-style ``Conv1D`` layers (a linear layer with
its weight stored transposed) become ``nn.Linear`` with identical outputs; BatchNorm folds into
the convolution before it. (A mixture of experts' fused weights become linears in
:mod:`lowbit.models.experts`.)"""

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


def checkpoint_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as the model's own checkpoints hold it: a float linear made from
    a Conv1D (``stored_transposed``) gives its weight back as (in, out), so a saved folder loads
    into the model's own classes (quantized layers are rebuilt from their codes instead)."""
    state = module.state_dict()
    for name, sub in module.named_modules():
        key = f"{name}.weight" if name else "weight"
        if type(sub) is nn.Linear and getattr(sub, "stored_transposed", False) and key in state:
            state[key] = state[key].t().contiguous()
    return state


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` or
    ``ConvTranspose2d`` in an ``nn.Sequential`` into that convolution (torch's
    ``fuse_conv_bn_eval``; the BatchNorm becomes ``nn.Identity``), so its scale is quantized
    with the weights it multiplies. Same outputs in eval mode; returns the count."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(conv) in (nn.Conv2d, nn.ConvTranspose2d) and type(bn) is nn.BatchNorm2d:
                if bn.training or not bn.track_running_stats:
                    continue  # batch statistics: nothing fixed to fold
                transposed = isinstance(conv, nn.ConvTranspose2d)
                if transposed and conv.groups != 1:
                    continue  # torch's fusion assumes one group for a transposed conv
                seq[i] = fuse_conv_bn_eval(conv.eval(), bn, transpose=transposed)
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded

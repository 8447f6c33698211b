"""Folding per-channel scales into a model without changing what it computes.

Multiplying input channel j of some linears by s_j is exact if the module feeding them divides
its output channel j by s_j: a norm's weight (and bias), Gemma's (1 + weight), or the rows (and
bias) of a feeding linear when only positively homogeneous ops (ReLU, a product with another
branch) lie between.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.models.families import PrevKind
from lowbit.nn.online import online_transform


def can_fold(prev: nn.Module, kind: PrevKind, linears: list[nn.Linear]) -> bool:
    """Whether ``prev``'s output channels line up with the linears' inputs and can absorb 1/s
    (not when an online rotation turns the inputs between them: it mixes the channels)."""
    width = {lin.in_features for lin in linears}
    if len(width) != 1 or any(online_transform(lin) is not None for lin in linears):
        return False
    (n,) = width
    if kind == "linear":
        return isinstance(prev, nn.Linear) and prev.out_features == n
    weight = getattr(prev, "weight", None)
    return isinstance(weight, Tensor) and weight.shape == (n,)


@torch.no_grad()
def fold_scales(prev: nn.Module, kind: PrevKind, linears: list[nn.Linear], s: Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' inputs by ``s``."""
    s = s.to(torch.float32)
    if kind == "linear":
        prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
    elif kind == "norm_plus_one":
        prev.weight.copy_(((1.0 + prev.weight.float()) / s - 1.0).to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.unsqueeze(0).to(lin.weight.dtype))

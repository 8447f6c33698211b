"""Folding per-channel scales into a model without changing what it computes.

Multiplying input channel j of some linears by s_j is exact if the module feeding them divides
its output channel j by s_j: a norm's weight (and bias), Gemma's (1 + weight), or the rows (and
bias) of a feeding linear when only positively homogeneous ops (ReLU, a product with another
branch) lie between. Convolutions (groups of 1) take part as linears do: a feeding convolution
divides its output channels, a reading one multiplies its input channels (every kernel tap),
exact through a LeakyReLU as through a ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.models.families import PrevKind
from lowbit.nn.linear_like import is_linear
from lowbit.nn.online import online_transform
from lowbit.nn.quant_conv import is_conv


def in_width(layer: nn.Module) -> int | None:
    """The input channels a linear or an ungrouped convolution reads (None for anything else:
    a grouped convolution's channels do not all meet the same weights)."""
    if is_linear(layer):
        return layer.in_features
    if is_conv(layer) and layer.groups == 1:
        return layer.in_channels
    return None


def out_width(layer: nn.Module) -> int | None:
    """The output channels of a linear or an ungrouped convolution (None otherwise)."""
    if is_linear(layer):
        return layer.out_features
    if is_conv(layer) and layer.groups == 1:
        return layer.out_channels
    return None


def can_fold(prev: nn.Module, kind: PrevKind, linears: list[nn.Module]) -> bool:
    """Whether ``prev``'s output channels line up with the linears' (or convolutions') inputs
    and can absorb 1/s (not when an online rotation turns the inputs between them: it mixes the
    channels). ``kind`` ``linear``: ``prev`` is a linear or convolution."""
    width = {in_width(lin) for lin in linears}
    if len(width) != 1 or None in width:
        return False
    if any(online_transform(lin) is not None for lin in linears):
        return False
    (n,) = width
    if kind == "linear":
        return out_width(prev) == n
    weight = getattr(prev, "weight", None)
    return isinstance(weight, Tensor) and weight.shape == (n,)


def channel_view(layer: nn.Module, s: Tensor, output: bool) -> Tensor:
    """``s`` shaped to scale ``layer.weight`` along its output (or input) channels: a linear's
    (out, in), a convolution's (out, in, kh, kw), a transposed one's (in, out, kh, kw)."""
    dim = 0 if output else 1
    if isinstance(layer, nn.ConvTranspose2d):
        dim = 1 - dim
    shape = [1] * layer.weight.dim()
    shape[dim] = -1
    return s.reshape(shape).to(layer.weight.dtype)


def input_columns(layer: nn.Module) -> Tensor:
    """The weight of a linear or an ungrouped convolution as a (rows, in) matrix whose column j
    holds every weight that reads input channel j (for a convolution: of every kernel tap)."""
    w = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):  # (in, out, kh, kw)
        return w.reshape(w.shape[0], -1).T
    if w.dim() == 4:  # (out, in, kh, kw)
        return w.transpose(0, 1).reshape(w.shape[1], -1).T
    return w


def folded_tensors(prev: nn.Module, linears: list[nn.Module]) -> list[Tensor]:
    """The tensors :func:`fold_scales` changes (to save and put back around a trial fold)."""
    own = [getattr(prev, "weight", None), getattr(prev, "bias", None)]
    return [t for t in own if isinstance(t, Tensor)] + [lin.weight for lin in linears]


@torch.no_grad()
def fold_scales(prev: nn.Module, kind: PrevKind, linears: list[nn.Module], s: Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' inputs by ``s``."""
    s = s.to(torch.float32)
    if kind == "linear":
        prev.weight.div_(channel_view(prev, s, output=True))
    elif kind == "norm_plus_one":
        prev.weight.copy_(((1.0 + prev.weight.float()) / s - 1.0).to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        lin.weight.mul_(channel_view(lin, s, output=False))

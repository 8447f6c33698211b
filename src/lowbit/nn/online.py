"""Online rotations: a layer's input turned by a Hadamard matrix at run time, whose transpose
was folded into the layer's weight (:mod:`lowbit.models.rotate`), so the layer computes the
same function while its input (and weight) round with less error.

The transform is a forward pre-hook on the layer, marked ``carried``: when quantization swaps
the layer for a packed one (or a kernel layer), :func:`lowbit.models.modules.set_module` moves
it to the replacement. :func:`online_transform` gives the decode loop the same function for
the layers it calls directly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lowbit.kernels.hadamard import hadamard_transform
from lowbit.primitives.hadamard import online_block


class OnlineHadamard:
    """A forward pre-hook turning the layer's input (..., n) by ``online_matrix(n)``."""

    carried = True  # kept on the module that replaces the layer

    def __init__(self, n: int) -> None:
        self.block = online_block(n)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.apply(args[0]), *args[1:])

    def apply(self, x: Tensor) -> Tensor:
        return hadamard_transform(x, self.block)


def install_online(module: nn.Module, width: int) -> None:
    """Turn ``module``'s input (``width`` channels) at run time (once: a second call is a
    no-op)."""
    if online_transform(module) is None:
        module.register_forward_pre_hook(OnlineHadamard(width))


def online_transform(module: nn.Module) -> OnlineHadamard | None:
    """The online rotation ``module`` applies to its input, if any."""
    found = [h for h in module._forward_pre_hooks.values() if isinstance(h, OnlineHadamard)]
    return found[0] if found else None


class OnlineStream:
    """A forward hook turning the module's output (..., n) by the rotated stream's matrix
    ``online_matrix(n)·diag(signs)`` (:func:`lowbit.algorithms.rotate.orthogonal`, ``fast``):
    for a norm whose output is added to the stream (Gemma 2/3's post-norms), whose scale does
    not commute with the rotation, so the matrix cannot be folded into the weights before it."""

    def __init__(self, signs: Tensor) -> None:
        self.block = online_block(signs.shape[0])
        self.signs = signs.float()
        self._on: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, dtype) -> block, signs

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        key = (out.device, out.dtype)
        if key not in self._on:  # copied once per device, not at every call
            self._on[key] = (self.block.to(out.device), self.signs.to(out.device, out.dtype))
        block, signs = self._on[key]
        return hadamard_transform(out, block) * signs


def install_stream(module: nn.Module, signs: Tensor) -> None:
    """Turn ``module``'s output by the stream's matrix at run time (once)."""
    if stream_transform(module) is None:
        module.register_forward_hook(OnlineStream(signs))


def stream_transform(module: nn.Module) -> OnlineStream | None:
    """The stream rotation ``module`` applies to its output, if any."""
    found = [h for h in module._forward_hooks.values() if isinstance(h, OnlineStream)]
    return found[0] if found else None

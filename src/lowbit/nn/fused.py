"""An ``nn.Sequential`` whose AVX2 integer kernel layers run the activation that follows them.

A ReLU or LeakyReLU (slope 0 to 1) after a layer on lowbit's AVX2 integer kernel (directly, or
past ``nn.Identity`` modules such as a folded BatchNorm leaves) is applied in that kernel's
epilogue: one pass over the float output less, as oneDNN's and LiteRT's fused activations do.
The pairs are found as the sequence runs, not by rewriting it: a slice that ends before the
activation, or code that calls the layers one by one, computes what the unfused model does
(the activation module stays in place; only its forward hooks are skipped where it is fused).
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.nn.kernel_tensor import Int8TensorKernel


def fused_slope(layers: list[nn.Module], i: int) -> tuple[float | None, int]:
    """(slope, index of the activation) where ``layers[i]`` takes the activation after it in
    its epilogue (0: ReLU), else (None, i)."""
    layer = layers[i]
    if not (isinstance(layer, Int8TensorKernel) and layer.panels):
        return None, i
    j = i + 1
    while j < len(layers) and isinstance(layers[j], nn.Identity):
        j += 1
    act = layers[j] if j < len(layers) else None
    if type(act) is nn.ReLU:
        return 0.0, j
    if isinstance(act, nn.LeakyReLU) and 0.0 <= act.negative_slope <= 1.0:
        return float(act.negative_slope), j
    return None, i


class FusedSequential(nn.Sequential):
    """See the module doc; made from a plain ``nn.Sequential`` by :func:`fuse_activations`."""

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            slope, j = fused_slope(layers, i)
            x = layers[i](x) if slope is None else layers[i](x, slope=slope)
            i = j + 1
        return x


def fuse_activations(model: nn.Module) -> int:
    """Make each plain ``nn.Sequential`` of ``model`` that holds such a pair a
    :class:`FusedSequential` (in place; its modules and names unchanged; subclasses, which may
    have their own forward, are left alone); the number of pairs. waifu2x-upconv7's four
    LeakyReLUs after such layers took 46 of 511 ms per 256x256 image on them (2 threads, AVX2,
    one measurement)."""
    fused = 0
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        layers = list(seq._modules.values())
        pairs = sum(fused_slope(layers, i)[0] is not None for i in range(len(layers)))
        if pairs:
            seq.__class__ = FusedSequential
            fused += pairs
    return fused

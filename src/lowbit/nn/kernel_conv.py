"""The inference module that runs a weight-only integer convolution from the affine layout.

A weight-only QuantConv's reference path dequantizes its packed codes with the general
primitives (several passes over the weight) at every call. This module holds the weight in the
affine kernel's layout (:mod:`lowbit.kernels.affine`, as a ``w4a16`` / ``w8a16`` linear does),
dequantizes it in one native pass per call and hands it to torch's float convolution, so RAM
holds the low-bit form only. The float convolution does the arithmetic: an image model's
convolutions are bound by their arithmetic, not by reading the weight.
"""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels.affine import AffineWeight, affine_dequantize
from lowbit.nn.kernel_linear import affine_weight
from lowbit.nn.quant_conv import ConvGeometry, QuantConv
from lowbit.nn.quant_linear import nbytes


class AffineKernelConv(nn.Module):
    """4- or 8-bit integer convolution weights (any grid, per channel or in groups of 32
    along the im2col row), float inputs and arithmetic."""

    def __init__(self, aw: AffineWeight, geometry: ConvGeometry, bias: Tensor | None) -> None:
        super().__init__()
        self.geometry, self.group, self.bits = geometry, aw.group, aw.bits
        self.out_features, self.in_features = geometry.shape
        self.register_buffer("w", aw.w)
        self.register_buffer("scale", aw.scale)
        self.register_buffer("offset", aw.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def kind(self) -> str:
        return f"w{self.bits}a16-conv"

    def storage_tensors(self) -> tuple[Tensor, ...]:
        return (self.w, self.scale, self.offset)

    def storage_bytes(self) -> dict[str, int]:
        params = nbytes(self.scale, self.offset)
        return {"codes": nbytes(self.w), "params": params, "bias": nbytes(self.bias)}

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C', H', W')
        g = self.geometry
        if x.dim() != 4 or x.shape[1] != g.in_channels:
            raise LowbitError(f"expected (N, {g.in_channels}, H, W), got a tensor of shape "
                              f"{tuple(x.shape)}")  # fmt: skip
        aw = AffineWeight(self.w, self.scale, self.offset, self.group, self.bits,
                          self.in_features)  # fmt: skip
        weight = g.weight(affine_dequantize(aw)).to(x.dtype)
        return g.apply(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = self.geometry
        kind = "transposed, " if g.transposed else ""
        return (f"{kind}{g.in_channels}, {g.out_channels}, kernel={g.kernel_size}, "
                f"stride={g.stride}, {self.kind}, group={self.group}")  # fmt: skip


def affine_conv_module(layer: QuantConv) -> AffineKernelConv | None:
    """The fast module of a weight-only integer convolution, or None."""
    aw = affine_weight(layer)
    return None if aw is None else AffineKernelConv(aw, layer.geometry, layer.bias)


__all__ = ["AffineKernelConv", "affine_conv_module"]

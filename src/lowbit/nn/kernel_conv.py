"""The inference module that runs a weight-only integer convolution from the affine layout.

A weight-only QuantConv's reference path dequantizes its packed codes with the general
primitives (several passes over the weight) at every call. This module holds the weight in the
affine kernel's layout (:mod:`lowbit.kernels.affine`, as a ``w4a16`` / ``w8a16`` linear does),
so RAM holds the low-bit form only, and takes one of two paths per call:

- most convolutions are bound by their arithmetic: the weight is dequantized in one native pass
  and torch's float convolution does the work;
- a convolution with few output positions for its weight (a UNet's 1280-channel layers at 8x8
  and 16x16) is bound by reading the weight, which that path writes out as float32 and reads
  again: there the input's im2col rows go through the affine kernel's GEMM instead (float
  inputs and sums, the codes read once). Chosen when the rows (batch x output positions) are
  at most ``out_channels / WEIGHT_BOUND``, a fixed rule (so a model computes the same on every
  call, whichever path is faster that minute). ``benchmarks/conv_speed.py --layers`` on a 2-core
  AVX-512 VM (2 threads, batch 1, 3x3, ms: float32 / dequantize + conv / im2col + GEMM, W8):
  1280->1280 at 8x8 41.4 / 65.3 / 22.1, at 16x16 67.2 / 91.7 / 62.2; 640->640 at 8x8
  4.5 / 5.3 / 5.5, at 16x16 10.8 / 12.0 / 16.8; 320->320 at 64x64 35.4 / 36.5 / 125.8: the rule
  picked the faster path (or one within 4%) for every shape and width there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels.affine import AffineWeight, affine_dequantize, affine_linear
from lowbit.nn.kernel_linear import affine_weight
from lowbit.nn.quant_conv import ConvGeometry, QuantConv
from lowbit.nn.quant_linear import nbytes

WEIGHT_BOUND = 4  # im2col + GEMM when rows <= out_channels / WEIGHT_BOUND (see above)


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
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.weight_bound(x):
            return self._im2col(x, aw, bias)
        return g.apply(x, g.weight(affine_dequantize(aw)).to(x.dtype), bias)

    def weight_bound(self, x: Tensor) -> bool:
        """Whether this call takes the im2col path (few output positions for the weight)."""
        g = self.geometry
        if g.transposed or g.groups != 1 or x.dtype != torch.float32:
            return False
        h, w = self._out_size(x)
        return x.shape[0] * h * w * WEIGHT_BOUND <= g.out_channels

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        g = self.geometry
        sizes = zip(x.shape[2:], g.kernel_size, g.stride, g.padding, g.dilation, strict=True)
        h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in sizes)
        return h, w

    def _im2col(self, x: Tensor, aw: AffineWeight, bias: Tensor | None) -> Tensor:
        g = self.geometry
        n, (h, w) = x.shape[0], self._out_size(x)
        y = affine_linear(g.patches(x), aw, act8=False)  # (N·H'·W', out): float inputs
        y = y.reshape(n, h, w, g.out_channels).permute(0, 3, 1, 2)
        return y if bias is None else y + bias[None, :, None, None]

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

"""The inference module that runs a W8A8 :class:`QuantConv` on an integer convolution.

:func:`lowbit.models.use_kernels` swaps each eligible QuantConv for an :class:`Int8KernelConv`
at load time (int8 symmetric per-output-channel weights, 8-bit per-tensor activations, static
or dynamic; a ``Conv2d``, or a ``ConvTranspose2d`` without groups or dilation; a CPU where
:mod:`lowbit.kernels.int8_conv` is exact); every other convolution keeps QuantConv's reference
path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.int8_conv import Int8Conv, int8_conv, onednn_conv_available, prepare_int8_conv
from lowbit.nn.quant_conv import ConvGeometry, QuantConv
from lowbit.nn.quant_linear import nbytes
from lowbit.primitives import QParams
from lowbit.primitives.activations import tensor_qparams


class Int8KernelConv(nn.Module):
    """int8 weights × 8-bit per-tensor input codes, int32 sums, float32 output."""

    kind = "w8a8-conv"

    def __init__(self, weight: Int8Conv, geometry: ConvGeometry, act: ActivationSpec,
                 static: QParams | None, bias: Tensor | None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = geometry.shape  # the matrix, as QuantConv's
        self.geometry, self.act = geometry, act
        self.weight_int8 = weight  # not a buffer: oneDNN's packed copy is an opaque tensor
        self.register_buffer("act_scale", None if static is None else static.scale.clone())
        zero = None if static is None or static.zero is None else static.zero.clone()
        self.register_buffer("act_zero", zero)
        # the bias the kernel adds is in ``weight`` (repeated per phase for a transposed layer)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    def storage_tensors(self) -> tuple[Tensor, ...]:
        return ()  # oneDNN's copy is no strided tensor: storage_bytes counts it

    def storage_bytes(self) -> dict[str, int]:
        """int8 codes and fp32 per-output-channel scales (oneDNN's blocking pads: not counted)."""
        n = self.out_features
        return {"codes": n * self.in_features, "params": 4 * n, "bias": nbytes(self.bias)}

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C', H', W')
        if x.dim() != 4 or x.shape[1] != self.geometry.in_channels:
            raise LowbitError(f"expected (N, {self.geometry.in_channels}, H, W), got a tensor of "
                              f"shape {tuple(x.shape)}")  # fmt: skip
        static = None if self.act_scale is None else QParams(self.act_scale, self.act_zero)
        qp = tensor_qparams(x, self.act, static)
        y = int8_conv(x, qp, self.act, self.weight_int8)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g.in_channels}, {g.out_channels}, kernel={g.kernel_size}, stride={g.stride}, "
                f"{self.kind}")  # fmt: skip


def conv_eligible(layer: QuantConv) -> bool:
    """Whether ``layer`` is the format :class:`Int8KernelConv` runs, on a CPU that runs it."""
    spec, act = layer.spec, layer.act
    g = layer.geometry
    if act is None or act.bits != 8 or act.granularity != "tensor":
        return False
    if g.transposed and (g.groups != 1 or g.dilation != (1, 1)):
        return False  # the phases of transposed_as_phases need neither
    if not act.dynamic and torch.isnan(layer.act_scale).any():
        return False  # an uncalibrated layer raises its own error on the reference path
    weights = (spec.format == "int" and spec.bits == 8 and bool(spec.symmetric)
               and spec.granularity == "channel" and not spec.lorc_rank)  # fmt: skip
    return weights and onednn_conv_available()


def conv_kernel_module(layer: QuantConv) -> Int8KernelConv | None:
    """The fast module for a convolution, or None when it keeps the reference path."""
    if not conv_eligible(layer):
        return None
    g = layer.geometry
    codes = g.weight(layer.int8_codes())
    weight = prepare_int8_conv(codes, layer.scale.reshape(-1), layer.bias, g.stride, g.padding,
                               g.dilation, g.groups, g.transposed, g.output_padding)  # fmt: skip
    static = None if layer.act.dynamic else QParams(layer.act_scale, layer.act_zero)
    return Int8KernelConv(weight, g, layer.act, static, layer.bias)


__all__ = ["Int8KernelConv", "conv_eligible", "conv_kernel_module"]

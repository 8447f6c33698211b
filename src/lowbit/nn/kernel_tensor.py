"""The inference module that runs a W8A8 layer with per-tensor activations on integers.

:func:`lowbit.models.use_kernels` swaps each eligible QuantConv or QuantLinear for an
:class:`Int8TensorKernel` at load time (int8 symmetric per-output-channel weights, 8-bit
per-tensor activations, static or dynamic; a linear, a ``Conv2d``, or a ``ConvTranspose2d``
without groups or dilation). Two kernels compute it, with the same integer sums: oneDNN's
(:mod:`lowbit.kernels.int8_conv`) on CPUs with VNNI, where it is exact; lowbit's AVX2 kernel
(:mod:`lowbit.kernels.int8_conv_avx2`) on the others, except for layers with fewer than 8
outputs per group (depthwise), more than 65,536 inputs per output, or a static range and fewer
than 256 inputs per output (:func:`panels_pay`), which there take the weight-only module's
float path (:func:`lowbit.nn.kernel_conv.affine_conv_module`). Every other such layer keeps
its reference path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8_conv import (
    Int8Conv,
    Int8TensorLinear,
    int8_conv,
    int8_tensor_linear,
    onednn_int8_available,
    prepare_int8_conv,
    prepare_int8_linear,
)
from lowbit.kernels.int8_conv_avx2 import (
    PANEL_MAX_INPUTS,
    PANEL_MIN_GROUP_OUTPUTS,
    PANEL_MIN_INPUTS,
    PanelConv,
    panel_conv,
    panel_inputs,
    panel_linear,
    prepare_panel_conv,
    prepare_panel_linear,
)
from lowbit.nn.quant_conv import ConvGeometry, QuantConv
from lowbit.nn.quant_linear import QuantLinear, nbytes
from lowbit.nn.steps import current_range
from lowbit.primitives import QParams
from lowbit.primitives.activations import tensor_qparams


class Int8TensorKernel(nn.Module):
    """int8 weights × 8-bit per-tensor input codes, int32 sums, float32 output: a convolution
    (``geometry``) or a linear (``geometry`` None)."""

    def __init__(self, weight: Int8Conv | Int8TensorLinear | PanelConv,
                 geometry: ConvGeometry | None,
                 shape: tuple[int, int], act: ActivationSpec, static: QParams | None,
                 bias: Tensor | None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape  # the weight matrix, as the layer's
        self.geometry, self.act = geometry, act
        self.weight_int8 = weight  # not a buffer: oneDNN's packed copy is an opaque tensor
        self.panels = isinstance(weight, PanelConv)
        self.register_buffer("act_scale", None if static is None else static.scale.clone())
        zero = None if static is None or static.zero is None else static.zero.clone()
        self.register_buffer("act_zero", zero)
        if static is not None and static.scale.numel() > 1:
            self.step_position: float | None = None  # set by lowbit.nn.select_step
        # the bias the kernel adds is in ``weight`` (repeated per phase for a transposed layer)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    def storage_tensors(self) -> tuple[Tensor, ...]:
        w = self.weight_int8
        return (w.panels, w.scale, w.sums) if self.panels else ()  # oneDNN's: opaque

    def storage_bytes(self) -> dict[str, int]:
        """int8 codes and fp32 per-output-channel scales (oneDNN's blocking pads: not counted;
        the AVX2 panels: their padding, one int32 correction and one code sum per channel)."""
        n, w = self.out_features, self.weight_int8
        if self.panels:
            params = w.scale.numel() * 4 + (w.sums.numel() + w.panels.shape[0] * 8) * 4
            return {"codes": w.panels.numel() - w.panels.shape[0] * 32, "params": params,
                    "bias": nbytes(self.bias)}  # fmt: skip
        return {"codes": n * self.in_features, "params": 4 * n, "bias": nbytes(self.bias)}

    @property
    def kind(self) -> str:
        kind = "w8a8-linear-tensor" if self.geometry is None else "w8a8-conv"
        return f"{kind}-avx2" if self.panels else kind

    def forward(self, x: Tensor, slope: float | None = None) -> Tensor:
        """(N, C, H, W) -> (N, C', H', W'), or (..., in) -> (..., out); with ``slope`` (the
        AVX2 kernel only: :class:`lowbit.nn.fused.FusedSequential`), leaky_relu(slope) of it
        (0: ReLU) in the kernel's epilogue."""
        if slope is not None and not self.panels:
            raise LowbitError("only the AVX2 kernel applies an activation in its epilogue")
        g = self.geometry
        static = None
        if self.act_scale is not None:
            position = getattr(self, "step_position", None)
            static = current_range(self.act_scale, self.act_zero, position, self.kind)
        if g is None:
            if x.shape[-1] != self.in_features:
                raise LowbitError(f"expected (..., {self.in_features}), got a tensor of shape "
                                  f"{tuple(x.shape)}")  # fmt: skip
            qp = tensor_qparams(x, self.act, static)
            if self.panels:
                return panel_linear(x, qp, self.act, self.weight_int8, slope).to(x.dtype)
            return int8_tensor_linear(x, qp, self.act, self.weight_int8).to(x.dtype)
        if x.dim() != 4 or x.shape[1] != g.in_channels:
            raise LowbitError(f"expected (N, {g.in_channels}, H, W), got a tensor of shape "
                              f"{tuple(x.shape)}")  # fmt: skip
        qp = tensor_qparams(x, self.act, static)
        if self.panels:
            return panel_conv(x, qp, self.act, self.weight_int8, slope).to(x.dtype)
        return int8_conv(x, qp, self.act, self.weight_int8).to(x.dtype)

    def extra_repr(self) -> str:
        g = self.geometry
        if g is None:
            return f"{self.in_features}, {self.out_features}, {self.kind}"
        return (f"{g.in_channels}, {g.out_channels}, kernel={g.kernel_size}, stride={g.stride}, "
                f"{self.kind}")  # fmt: skip


def tensor_eligible(layer: QuantLinear) -> bool:
    """Whether ``layer`` (a QuantLinear or QuantConv) is the format :class:`Int8TensorKernel`
    runs, on a CPU that runs it."""
    spec, act = layer.spec, layer.act
    g = getattr(layer, "geometry", None)
    if act is None or act.bits != 8 or act.granularity != "tensor":
        return False
    if g is not None and g.transposed and (g.groups != 1 or g.dilation != (1, 1)):
        return False  # the phases of transposed_as_phases need neither
    if not act.dynamic and torch.isnan(layer.act_scale).any():
        return False  # an uncalibrated layer raises its own error on the reference path
    weights = (spec.format == "int" and spec.bits == 8 and bool(spec.symmetric)
               and spec.granularity == "channel" and not spec.lorc_rank)  # fmt: skip
    if not weights:
        return False
    if onednn_int8_available():
        return True
    return native_ops() and layer.in_features <= PANEL_MAX_INPUTS and panels_pay(layer, g)


def panels_pay(layer: QuantLinear, g: ConvGeometry | None) -> bool:
    """Whether lowbit's AVX2 kernel is worth taking for this layer (see
    :mod:`lowbit.kernels.int8_conv_avx2`): a convolution with fewer than 8 outputs per group
    (depthwise) never; one with few inputs per output only where no float path takes it (a
    dynamic or per-timestep input range)."""
    if g is None:
        return True
    if g.groups > 1 and g.out_channels // g.groups < PANEL_MIN_GROUP_OUTPUTS:
        return False
    inputs = panel_inputs(g.in_channels, g.kernel_size, g.stride, g.groups, g.transposed)
    static = not layer.act.dynamic and layer.act_scale.numel() == 1
    return inputs >= PANEL_MIN_INPUTS or not static


def tensor_kernel_module(layer: QuantLinear) -> Int8TensorKernel | None:
    """The integer module for a W8A8 layer with per-tensor activations, or None when it keeps
    the reference path (any other format, or a CPU without an exact int8 product)."""
    if not tensor_eligible(layer):
        return None
    g = layer.geometry if isinstance(layer, QuantConv) else None
    scale = layer.scale.reshape(-1)
    if g is None:
        prepare = prepare_int8_linear if onednn_int8_available() else prepare_panel_linear
        weight = prepare(layer.int8_codes(), scale, layer.bias)
    elif onednn_int8_available():
        weight = prepare_int8_conv(g.weight(layer.int8_codes()), scale, layer.bias, g.stride,
                                   g.padding, g.dilation, g.groups, g.transposed,
                                   g.output_padding)  # fmt: skip
    else:
        weight = prepare_panel_conv(g.weight(layer.int8_codes()), scale, layer.bias, g.stride,
                                    g.padding, g.dilation, g.transposed, g.output_padding,
                                    g.groups)  # fmt: skip
    static = None if layer.act.dynamic else QParams(layer.act_scale, layer.act_zero)
    shape = (layer.out_features, layer.in_features)
    return Int8TensorKernel(weight, g, shape, layer.act, static, layer.bias)


__all__ = ["Int8TensorKernel", "tensor_eligible", "tensor_kernel_module"]

"""W8A8 with per-tensor activations on CPUs without VNNI: int8 per-output-channel weights ×
8-bit per-tensor input codes, exact int32 sums, float32 output, through lowbit's AVX2 kernel
(``csrc/int8_conv.cpp``: im2col rows a block at a time against the weight panels of
``csrc/int8_gemm.cpp``, whose product cannot saturate).

The same arithmetic as :mod:`lowbit.kernels.int8_conv` (oneDNN's, on VNNI CPUs): the input's
codes from :func:`lowbit.kernels.int8_conv.input_codes`, ``conv((u - z)·s_x, w·s_w) + bias``
with the integer sums exact, so a model's outputs agree with its reference path up to float32
rounding on either CPU. Plain convolutions (any stride, padding, dilation);
transposed ones as one plain convolution over their output phases
(:func:`lowbit.kernels.int8_conv.transposed_as_phases`); a linear as a 1x1 convolution of its
rows. A grouped convolution runs one such product per group (its channels' rows against its
panels), where each group has at least :data:`PANEL_MIN_GROUP_OUTPUTS` outputs: a panel holds
8, so a depthwise layer would compute 8x its products; such layers keep the weight-only
module's float path, as do those with a static input range and fewer than
:data:`PANEL_MIN_INPUTS` inputs per output (an image model's first layer), where that path is
as fast or faster (measured: see the constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.int8 import pack_panels
from lowbit.kernels.int8_conv import Phases, as_plain, extra_inputs, input_codes, interleave
from lowbit.primitives import QParams

# Inputs per output (im2col row) whose int32 sums stay exact: |sum (u - z) w| <= 255 * 128 * K
# (the C++ op refuses more; such a layer keeps the weight-only module's float path).
PANEL_MAX_INPUTS = 65536
# Outputs per group, at least, for a grouped convolution on the panels (see the module doc).
PANEL_MIN_GROUP_OUTPUTS = 8
# Inputs per output (per group; a transposed convolution's phases') below which a convolution
# with one static input range keeps the weight-only module's float path: with few inputs the
# tile's fixed costs and the im2col copy outweigh the integer product. One alternating run per
# layer (2-core AMD EPYC held to AVX2, 2 threads, 15 rounds, medians, ms, this kernel against
# that float path): 27 inputs (3->16 at 256x256) 1.10 / 0.37, 72 (8->64 at 128x128) 0.83 /
# 0.76, 144 with 16 outputs per group 0.83 / 0.67 and 0.40 / 0.38, 144 with 32 (16->32 at
# 254x254) 2.96 / 2.99; against float32 itself, an earlier run: 288 (32->64 at 252x252)
# 10.2 / 10.8, 576 and more x1.2-1.5 faster on the kernel.
PANEL_MIN_INPUTS = 256


@dataclass
class PanelConv:
    """The weight codes as AVX2 panels (inputs ordered (ky, kx, channel); each group's panels
    in turn), per-output-channel fp32 scales, each output channel's code sum (int32), the bias
    and the geometry (for a transposed convolution, that of its phases)."""

    panels: Tensor
    scale: Tensor
    sums: Tensor
    bias: Tensor | None
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int = 1
    phases: Phases | None = None


def panel_inputs(in_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                 groups: int, transposed: bool) -> int:  # fmt: skip
    """Inputs per output of the kernel's product: in/groups·kh·kw, or for a transposed
    convolution its phases' in·ceil(kh/sy)·ceil(kw/sx) (:func:`as_plain`)."""
    (kh, kw), (sy, sx) = kernel, stride
    if transposed:
        return in_channels * -(-kh // sy) * -(-kw // sx)
    return in_channels // groups * kh * kw


def prepare_panel_conv(codes: Tensor, scale: Tensor, bias: Tensor | None,
                       stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int], transposed: bool = False,
                       output_padding: tuple[int, int] = (0, 0),
                       groups: int = 1) -> PanelConv:  # fmt: skip
    """Pack int8 weight codes in the layer's own layout ((out, in / groups, kh, kw), or (in,
    out, kh, kw) transposed, one group) with per-output-channel scales."""
    codes, scale, bias, stride, padding, dilation, phases = as_plain(
        codes, scale, bias, stride, padding, dilation, transposed, output_padding)  # fmt: skip
    codes = codes.to(torch.int8)
    rows = codes.permute(0, 2, 3, 1).reshape(codes.shape[0], -1)  # (out, kh·kw·in/groups)
    sums = rows.int().sum(1, dtype=torch.int32)
    panels = torch.cat([pack_panels(r.contiguous()) for r in rows.chunk(groups)])
    return PanelConv(panels, scale, sums, bias, tuple(codes.shape[-2:]), tuple(stride),
                     tuple(padding), tuple(dilation), groups, phases)  # fmt: skip


def prepare_panel_linear(codes: Tensor, scale: Tensor, bias: Tensor | None) -> PanelConv:
    """A linear's int8 codes (out, in) as a 1x1 convolution's."""
    return prepare_panel_conv(codes[:, :, None, None], scale, bias, (1, 1), (0, 0), (1, 1))


def panel_conv(x: Tensor, qp: QParams, spec: ActivationSpec, weight: PanelConv,
               slope: float | None = None) -> Tensor:  # fmt: skip
    """``conv((codes - zero)·scale, W) + bias`` for float32 ``x`` (N, C, H, W) rounded to the
    per-tensor grid ``qp``; float32 out, channels-last; with ``slope`` (0 to 1), a LeakyReLU
    of that slope (0: a ReLU) applied to it in the same pass."""
    codes = input_codes(x.float().contiguous(memory_format=torch.channels_last), qp, spec)
    zero, phases = int(qp.zero), weight.phases
    if phases is not None and any(more := extra_inputs(phases, x.shape)):
        codes = torch.nn.functional.pad(codes, (0, more[1], 0, more[0]), value=zero)
    y = torch.ops.lowbit_cpu.int8_conv_panels(
        codes, weight.kernel, weight.stride, weight.padding, weight.dilation, weight.groups,
        zero, float(qp.scale), weight.panels, weight.scale, weight.sums, weight.bias, slope,
    )  # fmt: skip
    return y if phases is None else interleave(y, x.shape, phases)


def panel_linear(x: Tensor, qp: QParams, spec: ActivationSpec, weight: PanelConv,
                 slope: float | None = None) -> Tensor:  # fmt: skip
    """``((codes - zero)·scale) @ Wᵀ + bias`` for float32 ``x`` (..., in): its rows as the
    pixels of a 1x1 convolution (a channels-last (M, in, 1, 1) view of the same memory)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.float().reshape(-1, k).contiguous()
    pixels = rows.view(-1, 1, 1, k).permute(0, 3, 1, 2)
    y = panel_conv(pixels, qp, spec, weight, slope)  # (M, out, 1, 1) channels-last: (M, out)
    return y.permute(0, 2, 3, 1).reshape(*lead, -1)


__all__ = ["PANEL_MAX_INPUTS", "PANEL_MIN_GROUP_OUTPUTS", "PANEL_MIN_INPUTS", "PanelConv",
           "panel_conv", "panel_inputs", "panel_linear", "prepare_panel_conv",
           "prepare_panel_linear"]  # fmt: skip

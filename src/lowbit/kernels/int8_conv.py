"""W8A8 with per-tensor activations: int8 per-output-channel weights × 8-bit per-tensor
activations (a static, calibrated range or the tensor's own), int32 accumulation, float32
output, through oneDNN's quantized convolution and linear as torch ships them
(``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``, the ops torch's own x86 int8
inference lowers to). Convolutions of image models, and the linears beside them (a UNet's
attention, a squeeze-excitation block), whose activations are rounded per tensor.

The activation codes are lowbit's (:func:`lowbit.primitives.activations.act_codes`): uint8 with
an integer zero point (a symmetric grid is zero point 128), so the op computes exactly
``conv((u - z)·s_x, w_int8·s_w) + bias``, what :class:`lowbit.nn.QuantConv` computes with
dequantized tensors, up to float32 rounding.

Only on CPUs with VNNI (:func:`lowbit.kernels.int8.has_vnni`: AVX-512 VNNI or AVX-VNNI) where
probes of the worst case (255 against -128 over 288 products) are exact: there oneDNN
multiplies uint8 by int8 with ``vpdpbusd`` in int32. Without VNNI it uses ``vpmaddubsw``, whose
int16 pair sums saturate on full-range codes (measured with ``ONEDNN_MAX_CPU_ISA=AVX2``: up to
4% relative error on waifu2x's layers), so other CPUs run lowbit's AVX2 kernel instead
(:mod:`lowbit.kernels.int8_conv_avx2`, the same arithmetic; this module's input codes,
transposed phases and interleave). Transposed
convolutions run as one plain convolution over their output phases
(:func:`transposed_as_phases`: torch has no integer transposed convolution).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8 import has_vnni
from lowbit.primitives import QParams
from lowbit.primitives.activations import act_codes, fake_quantize_static


@dataclass(frozen=True)
class Phases:
    """A transposed convolution's geometry, run as :func:`transposed_as_phases` does."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    kernel: tuple[int, int]
    output_padding: tuple[int, int]

    def taps(self, axis: int) -> int:
        """J: taps per phase along ``axis``."""
        return -(-self.kernel[axis] // self.stride[axis])

    def out_size(self, size: int, axis: int) -> int:
        s, p, k, op = (v[axis] for v in (self.stride, self.padding, self.kernel,
                                          self.output_padding))  # fmt: skip
        return (size - 1) * s - 2 * p + k + op


@dataclass
class Int8Conv:
    """oneDNN's packed weight, its per-output-channel fp32 scales, bias and geometry (for a
    transposed convolution, that of its phases: see :func:`transposed_as_phases`)."""

    packed: Tensor
    scale: Tensor
    zeros: Tensor  # the weights' zero points (all 0, symmetric): the op takes them per call
    bias: Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    phases: Phases | None = None
    codes: Tensor | None = None  # the int8 codes packed (always set by prepare_int8_conv), for
    # the shapes oneDNN gets wrong


@dataclass
class Int8TensorLinear:
    """oneDNN's packed int8 weight (out, in) of a linear, its per-row fp32 scales and bias."""

    packed: Tensor
    scale: Tensor
    zeros: Tensor
    bias: Tensor | None


@functools.cache
def onednn_int8_available() -> bool:
    """Whether this torch has oneDNN's int8 convolution and linear and the CPU multiplies
    exactly (VNNI, and the probe of :func:`_exact_on_worst_case`)."""
    if not has_vnni():
        return False
    try:
        ops = hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.enabled
        return ops and _exact_on_worst_case()
    except (AttributeError, RuntimeError):
        return False


def _exact_on_worst_case() -> bool:
    """Codes 255 (zero point 0) against weights -128 and 127 over 32 channels: each pair of
    products overflows int16, so a saturating product (``vpmaddubsw``) shows, while every sum
    (at most 288 · 255 · 128 < 2^24) is exact in the float32 output. 3x3, 1x1 and grouped
    convolutions (oneDNN may pick another kernel for each) and the linear."""
    spec = ActivationSpec(bits=8, granularity="tensor", dynamic=False, symmetric=False)
    qp = QParams(torch.ones(1), torch.zeros(1, dtype=torch.uint8))
    x = torch.full((1, 32, 6, 6), 255.0)

    def worst(*shape: int) -> Tensor:  # 16 output channels: 8 of -128, 8 of 127
        codes = torch.full((16, *shape), -128, dtype=torch.int8)
        codes[8:] = 127
        return codes

    for size, groups in ((3, 1), (1, 1), (3, 2)):
        codes, pad = worst(32 // groups, size, size), size // 2
        got = int8_conv(x, qp, spec, prepare_int8_conv(codes, torch.ones(16), None, (1, 1),
                                                       (pad, pad), (1, 1), groups))  # fmt: skip
        exact = torch.nn.functional.conv2d(x.double(), codes.double(), padding=pad,
                                           groups=groups)  # fmt: skip
        if not torch.equal(got.double(), exact):
            return False
    rows, xs = worst(288), torch.full((2, 288), 255.0)
    linear = int8_tensor_linear(xs, qp, spec, prepare_int8_linear(rows, torch.ones(16), None))
    return torch.equal(linear.double(), xs.double() @ rows.double().T)


def prepare_int8_conv(codes: Tensor, scale: Tensor, bias: Tensor | None,
                      stride: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int], groups: int, transposed: bool = False,
                      output_padding: tuple[int, int] = (0, 0)) -> Int8Conv:  # fmt: skip
    """Pack int8 weight codes in the layer's own layout ((out, in/groups, kh, kw), or (in, out,
    kh, kw) transposed) with per-output-channel scales."""
    codes, scale, bias, stride, padding, dilation, phases = as_plain(
        codes, scale, bias, stride, padding, dilation, transposed, output_padding)  # fmt: skip
    # a dilation along an axis of one tap changes nothing, and crashed oneDNN (torch 2.13)
    dilation = tuple(1 if codes.shape[2 + axis] == 1 else d for axis, d in enumerate(dilation))
    geometry = [list(stride), list(padding), list(dilation)]
    codes = codes.to(torch.int8).contiguous()
    # the input range given here only picks oneDNN's layout; each call passes its own
    packed = torch.ops.onednn.qconv_prepack(codes, scale, 1.0, 0, *geometry, groups, None)
    zeros = torch.zeros(scale.numel(), dtype=torch.long)
    return Int8Conv(packed, scale, zeros, bias, *geometry, groups, phases, codes)


def as_plain(codes: Tensor, scale: Tensor, bias: Tensor | None, stride: tuple[int, int],
             padding: tuple[int, int], dilation: tuple[int, int], transposed: bool,
             output_padding: tuple[int, int]):  # fmt: skip
    """A layer's codes, fp32 scales and bias and its geometry as a plain convolution's: a
    transposed one as its phases' (:func:`transposed_as_phases`, stride 1, padding J - 1),
    with the :class:`Phases` to interleave its output (else None)."""
    scale = scale.float().reshape(-1).contiguous()
    bias = None if bias is None else bias.detach().float().reshape(-1).contiguous()
    if not transposed:
        return codes, scale, bias, stride, padding, dilation, None
    codes, scale, bias, phases = transposed_as_phases(codes, scale, bias, stride, padding,
                                                      output_padding)  # fmt: skip
    kh, kw = codes.shape[-2:]
    return codes, scale, bias, (1, 1), (kh - 1, kw - 1), (1, 1), phases


def transposed_as_phases(codes: Tensor, scale: Tensor, bias: Tensor | None,
                         stride: tuple[int, int], padding: tuple[int, int],
                         output_padding: tuple[int, int]):  # fmt: skip
    """A transposed convolution (groups and dilation 1) as one plain convolution (stride 1,
    padding J-1) with ``sy·sx`` times the output channels, one per output phase, then the
    phases interleaved and the result cropped by the padding (sub-pixel convolution; torch
    has no integer transposed convolution). Output pixel ``o`` (plus padding) = ``q·s + r``
    reads the taps ``a = r + j·s`` at input ``q - j``: phase ``r``'s kernel is those taps
    reversed, ``J = ceil(k / s)`` of them (zero codes where ``a >= k``). The same codes and
    scales, rearranged: the integer sums are the reference's."""
    cin, cout, kh, kw = codes.shape
    (sy, sx) = stride
    jy, jx = -(-kh // sy), -(-kw // sx)
    padded = torch.zeros(cin, cout, jy * sy, jx * sx, dtype=codes.dtype)
    padded[:, :, :kh, :kw] = codes
    ay = torch.arange(sy)[:, None] + (jy - 1 - torch.arange(jy))[None, :] * sy  # (sy, jy)
    ax = torch.arange(sx)[:, None] + (jx - 1 - torch.arange(jx))[None, :] * sx  # (sx, jx)
    taps = padded[:, :, ay[:, :, None, None], ax[None, None, :, :]]  # (cin, cout, sy, jy, sx, jx)
    phased = taps.permute(1, 2, 4, 0, 3, 5).reshape(cout * sy * sx, cin, jy, jx)
    scale = scale.repeat_interleave(sy * sx)
    bias = None if bias is None else bias.repeat_interleave(sy * sx)
    phases = Phases(tuple(stride), tuple(padding), (kh, kw), tuple(output_padding))
    return phased, scale, bias, phases


def prepare_int8_linear(codes: Tensor, scale: Tensor, bias: Tensor | None) -> Int8TensorLinear:
    """Pack a linear's int8 codes (out, in) with per-row scales (oneDNN's int8 linear)."""
    packed = torch.ops.onednn.qlinear_prepack(codes.to(torch.int8).contiguous(), None)
    bias = None if bias is None else bias.detach().float().contiguous()
    scale = scale.float().reshape(-1).contiguous()
    return Int8TensorLinear(packed, scale, torch.zeros(scale.numel(), dtype=torch.long), bias)


def int8_tensor_linear(x: Tensor, qp: QParams, spec: ActivationSpec,
                       weight: Int8TensorLinear) -> Tensor:  # fmt: skip
    """``((codes - zero)·scale) @ Wᵀ + bias`` for float32 ``x`` (..., in) rounded to the
    per-tensor grid ``qp``, as :func:`int8_conv` for a linear."""
    codes = input_codes(x, qp, spec)
    return torch.ops.onednn.qlinear_pointwise(
        codes, float(qp.scale), int(qp.zero), weight.packed, weight.scale, weight.zeros,
        weight.bias,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def input_codes(x: Tensor, qp: QParams, spec: ActivationSpec) -> Tensor:
    """:func:`lowbit.primitives.activations.act_codes` in one pass (lowbit's C++ op) where it
    is built."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and native_ops():
        return torch.ops.lowbit_cpu.quantize_u8(_dense(x), float(qp.scale), int(qp.zero))
    return act_codes(x, qp, spec)


def rounded_input(x: Tensor, qp: QParams, spec: ActivationSpec) -> Tensor:
    """``x`` on the per-tensor grid ``qp`` (:func:`lowbit.primitives.activations.tensor_qparams`)
    back in float, ``(codes - zero)·scale``: :func:`fake_quantize_static`'s numbers, in one pass
    (lowbit's C++ op) and ``x``'s memory layout where it is built."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and native_ops():
        return torch.ops.lowbit_cpu.fake_quantize_u8(_dense(x), float(qp.scale), int(qp.zero))
    return fake_quantize_static(x, qp, spec)


def int8_conv(x: Tensor, qp: QParams, spec: ActivationSpec, weight: Int8Conv) -> Tensor:
    """``conv((codes - zero)·scale, W) + bias`` for float32 ``x`` (N, C, H, W) rounded to the
    per-tensor grid ``qp`` (:func:`lowbit.primitives.activations.tensor_qparams`); float32
    out (channels-last, as oneDNN writes it)."""
    codes = input_codes(x, qp, spec)
    zero, phases = int(qp.zero), weight.phases
    if phases is not None and any(more := extra_inputs(phases, x.shape)):
        codes = torch.nn.functional.pad(codes, (0, more[1], 0, more[0]), value=zero)
    padding = weight.padding
    if any(padding[a] >= _extent(weight, a) for a in (0, 1)):
        # oneDNN (torch 2.13) pads otherwise than with the zero point where the padding is as
        # wide as the kernel (errors of 4e6 found by fuzzing): the codes are padded here
        codes = torch.nn.functional.pad(codes, (padding[1],) * 2 + (padding[0],) * 2, value=zero)
        padding = [0, 0]
    if _onednn_wrong(codes.shape, weight, padding):
        return _exact_conv(codes, qp, weight, padding)
    y = torch.ops.onednn.qconv2d_pointwise(
        codes, float(qp.scale), zero, weight.packed, weight.scale, weight.zeros, weight.bias,
        weight.stride, padding, weight.dilation, weight.groups, 1.0, 0, torch.float32,
        "none", [], "",
    )  # fmt: skip
    return y if phases is None else interleave(y, x.shape, phases)


def _extent(weight: Int8Conv, axis: int) -> int:
    """Input pixels one output reads along ``axis`` (the dilated kernel)."""
    return (weight.codes.shape[2 + axis] - 1) * weight.dilation[axis] + 1


def _onednn_wrong(shape: torch.Size, weight: Int8Conv, padding: list[int]) -> bool:
    """Whether oneDNN's int8 convolution (torch 2.13) gets this call wrong: an output of one
    pixel along an axis with stride 2 or more (found by fuzzing against exact sums: stride
    (1, 2) with an output width of 1 gave errors of 40 on outputs of 29)."""
    for axis in (0, 1):
        size = shape[2 + axis] + 2 * padding[axis] - _extent(weight, axis)
        if size // weight.stride[axis] == 0 and weight.stride[axis] > 1:
            return True
    return False


def _exact_conv(codes: Tensor, qp: QParams, weight: Int8Conv, padding: list[int]) -> Tensor:
    """The integer convolution of input codes with the weight codes in float64 (exact sums),
    scaled as oneDNN's output is: the path for the few shapes :func:`_onednn_wrong` names."""
    u = codes.double() - int(qp.zero)  # (padded with zeros below: the zero point's code)
    sums = torch.nn.functional.conv2d(u, weight.codes.double(), None, weight.stride, padding,
                                      weight.dilation, weight.groups)  # fmt: skip
    y = sums * weight.scale.double().reshape(1, -1, 1, 1) * float(qp.scale)
    if weight.bias is not None:
        y = y + weight.bias.double().reshape(1, -1, 1, 1)
    return y.float()


def extra_inputs(phases: Phases, shape: torch.Size) -> list[int]:
    """Input rows and columns (of zeros) to append so that the phases' convolution reaches the
    last output pixel: (size + J - 1)·s outputs must cover padding + output size (only an
    output padding larger than the padding needs any)."""
    out = []
    for axis in (0, 1):
        size, s = shape[2 + axis], phases.stride[axis]
        short = phases.padding[axis] + phases.out_size(size, axis)
        short -= (size + phases.taps(axis) - 1) * s
        out.append(max(0, -(-short // s)))
    return out


def interleave(y: Tensor, shape: torch.Size, phases: Phases) -> Tensor:
    """The phases' channels (N, C·sy·sx, Hq, Wq) -> the transposed convolution's output: phase
    (ry, rx) of pixel (qy, qx) is output pixel (qy·sy + ry - py, qx·sx + rx - px)."""
    (sy, sx), (py, px) = phases.stride, phases.padding
    n, c, hq, wq = y.shape[0], y.shape[1] // (sy * sx), y.shape[2], y.shape[3]
    full = y.reshape(n, c, sy, sx, hq, wq).permute(0, 1, 4, 2, 5, 3).reshape(n, c, hq * sy, -1)
    oh, ow = phases.out_size(shape[2], 0), phases.out_size(shape[3], 1)
    return full[:, :, py : py + oh, px : px + ow]


def _dense(x: Tensor) -> Tensor:
    """float32 ``x`` contiguous, kept channels-last where it is (oneDNN's outputs: no copy); a
    cropped view (a transposed layer's interleaved phases) is copied: the C++ ops read dense
    tensors."""
    x = x.float()
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return x if cl or x.is_contiguous() else x.contiguous()


__all__ = ["Int8Conv", "Int8TensorLinear", "Phases", "as_plain", "extra_inputs", "input_codes",
           "int8_conv", "int8_tensor_linear", "interleave", "onednn_int8_available",
           "prepare_int8_conv", "prepare_int8_linear", "transposed_as_phases"]  # fmt: skip

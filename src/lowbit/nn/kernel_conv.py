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

The dequantize + conv path runs a plain convolution channels-last (its input converted once;
its output, channels-last, feeds the next layer without a copy): a one-off comparison on a
2-core AMD EPYC VM (2 threads, images/s, weight-only per-channel models on the kernels, the
same for W8 and W4 within noise) gave waifu2x-upconv7 0.97 -> 1.27 and upresnet10
2.62 -> 2.88 (float32 itself: 0.99 -> 1.25 and 2.61 -> 2.92 channels-last), on the AVX2
path alike. Transposed convolutions keep torch's default layout: the DCGAN's ran 1.5x slower
channels-last.

A transposed convolution with one group per output channel (a generator's layers) holds its
codes as its column matrix, (out·kh·kw, in): the same codes and bytes, rows reordered. Its
first layers see few input pixels (a 1x1 latent, then 4x4) against a large weight, which the
float path dequantizes at every call and oneDNN's deconvolution handled slowly there. When the
layer has at least ``COLUMN_WEIGHT`` (32,768) weights per input pixel of the call (batch x
height x width) the pixels' channels go through the affine GEMM (codes read once) and
``F.fold`` adds the kh x kw patches into place (:meth:`AffineKernelConv._col2im`); otherwise
the codes are dequantized straight into the layer's contiguous (in, out, kh, kw) weight
(``affine_dequantize_columns``: one native pass, as the row layout's) for torch's transposed
convolution, on a channels-last input (with the contiguous weight, the generators' batch-16
calls ran 1.1-1.2x faster so; see README). Per layer of the DCGAN and the eye generator (W8,
batch 1 and 16, alternating, ms), the GEMM won by up to 13x where a layer had >= 32K weights
per pixel (the eye generator's 1024->512 layer at 4x4, batch 1: 3.9 against 49.4 ms) and
lost where it had fewer (its 512->256 layer at 8x8, batch 16, 2K per pixel: 72.6 against
30.5); the rule
``batch x output positions x WEIGHT_BOUND <= out·kh·kw`` of plain convolutions sent such
layers to the GEMM. One alternating comparison of whole models, the same process, W8 per
channel, 2 threads, images/s, row layout -> columns (AVX-512 run; AVX2 run): dcgan-faces
batch 1 69.5 -> 239.8 (56.5 -> 202.4), batch 16 359.0 -> 355.8 (365.4 -> 344.1);
cdcgan-eyes batch 1 13.9 -> 56.4 (15.5 -> 58.5), batch 16 81.4 -> 98.0 (64.2 -> 78.7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec
from lowbit.kernels.affine import (
    AffineWeight,
    affine_dequantize,
    affine_dequantize_columns,
    affine_linear,
    to_affine,
)
from lowbit.kernels.int8_conv import rounded_input
from lowbit.nn.kernel_linear import affine_parts
from lowbit.nn.quant_conv import ConvGeometry, QuantConv
from lowbit.nn.quant_linear import nbytes
from lowbit.primitives import QParams
from lowbit.primitives.activations import tensor_qparams

WEIGHT_BOUND = 4  # im2col + GEMM when rows <= out_channels / WEIGHT_BOUND (see above)
COLUMN_WEIGHT = 1 << 15  # a transposed convolution's GEMM: weights per input pixel, at least


class AffineKernelConv(nn.Module):
    """4- or 8-bit integer convolution weights (any grid, per channel or in groups of 32
    along the im2col row), float arithmetic; float inputs, or with ``rounding`` (the input's
    spec and its per-tensor (scale, integer zero) from :func:`tensor_qparams`) inputs rounded
    to one static 8-bit range as the reference path rounds them: a W8A8 layer on a CPU without
    the integer convolution (see :func:`affine_conv_module`)."""

    def __init__(self, aw: AffineWeight, geometry: ConvGeometry, bias: Tensor | None,
                 columns: bool = False,
                 rounding: tuple[ActivationSpec, QParams] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.geometry, self.group, self.bits = geometry, aw.group, aw.bits
        self.out_features, self.in_features = geometry.shape
        self.columns = columns  # a transposed convolution's codes as its column matrix
        self.register_buffer("w", aw.w)
        self.register_buffer("scale", aw.scale)
        self.register_buffer("offset", aw.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.act, qp = rounding or (None, None)
        self.register_buffer("act_scale", None if qp is None else qp.scale.clone())
        self.register_buffer("act_zero", None if qp is None else qp.zero.clone())

    @property
    def kind(self) -> str:
        return f"w{self.bits}a{'8-float' if self.act is not None else '16'}-conv"

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
        if self.act is not None:
            x = self._rounded(x)
        width = g.in_channels if self.columns else self.in_features  # codes per row
        aw = AffineWeight(self.w, self.scale, self.offset, self.group, self.bits, width)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.weight_bound(x):
            return self._col2im(x, aw, bias) if self.columns else self._im2col(x, aw, bias)
        if self.columns:  # (out·kh·kw, in) -> (in, out·kh·kw): the layer's (in, out, kh, kw)
            kh, kw = g.kernel_size
            w = affine_dequantize_columns(aw, kh * kw)
            w = w.view(g.in_channels, g.out_channels, kh, kw)
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's faster layout here
            return g.apply(x, w.to(x.dtype), bias)
        if not g.transposed:  # oneDNN's float convolution runs channels-last faster (see above)
            x = x.contiguous(memory_format=torch.channels_last)
        return g.apply(x, g.weight(affine_dequantize(aw)).to(x.dtype), bias)

    def _rounded(self, x: Tensor) -> Tensor:
        """The input on its static 8-bit grid, the reference's numbers, in one native pass and
        the layout the convolution reads (channels-last for a plain one)."""
        if not self.geometry.transposed:
            x = x.contiguous(memory_format=torch.channels_last)
        qp = QParams(self.act_scale, self.act_zero)
        return rounded_input(x.float(), qp, self.act).to(x.dtype)

    def weight_bound(self, x: Tensor) -> bool:
        """Whether this call takes the GEMM path (few positions for the weight): im2col rows,
        or for a transposed convolution held as columns, its input pixels."""
        g = self.geometry
        if g.groups != 1 or x.dtype != torch.float32:
            return False
        if self.columns:  # the GEMM's rows are input pixels (see COLUMN_WEIGHT)
            kh, kw = g.kernel_size
            weights = g.in_channels * g.out_channels * kh * kw
            return x.shape[0] * x.shape[2] * x.shape[3] * COLUMN_WEIGHT <= weights
        if g.transposed:
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

    def _col2im(self, x: Tensor, aw: AffineWeight, bias: Tensor | None) -> Tensor:
        """A transposed convolution as one GEMM and an overlap-add: each input pixel's channels
        times the (out·kh·kw, in) column matrix give the kh x kw patch it adds to the output
        (``F.fold`` sums the patches at the stride, crops the padding)."""
        g = self.geometry
        (kh, kw), (n, c, h, w) = g.kernel_size, x.shape
        cols = affine_linear(x.permute(0, 2, 3, 1).reshape(-1, c), aw, act8=False)
        if (h, w) == (1, 1) and g.dilation == (1, 1) and g.output_padding == (0, 0):
            # one input pixel (a generator's latent): its patch is the output, nothing overlaps
            # (F.fold's loop took longer than the GEMM here); the padding is cropped
            (ph, pw), patch = g.padding, cols.view(n, g.out_channels, kh, kw)
            y = patch[:, :, ph : kh - ph, pw : kw - pw]
            return y if bias is None else y + bias[None, :, None, None]
        cols = cols.reshape(n, h * w, -1).transpose(1, 2)  # (N, out·kh·kw, H·W)
        size = [(n_in - 1) * s - 2 * p + d * (k - 1) + op + 1 for n_in, s, p, d, k, op in zip(
            (h, w), g.stride, g.padding, g.dilation, g.kernel_size, g.output_padding,
            strict=True)]  # fmt: skip
        y = F.fold(cols, size, (kh, kw), dilation=g.dilation, padding=g.padding,
                   stride=g.stride)  # fmt: skip
        return y if bias is None else y + bias[None, :, None, None]

    def extra_repr(self) -> str:
        g = self.geometry
        kind = "transposed, " if g.transposed else ""
        return (f"{kind}{g.in_channels}, {g.out_channels}, kernel={g.kernel_size}, "
                f"stride={g.stride}, {self.kind}, group={self.group}")  # fmt: skip


def affine_conv_module(layer: QuantConv) -> AffineKernelConv | None:
    """The fast module of a weight-only integer convolution, or None. A transposed one with one
    group per output channel holds its codes as its column matrix (out·kh·kw, in): the same
    codes and bytes, rows reordered, so that few input pixels take one GEMM (:meth:`_col2im`).

    A W8A8 convolution (one static 8-bit input range) that no integer convolution takes (a
    depthwise one on a CPU without VNNI: :func:`lowbit.nn.kernel_tensor.tensor_eligible`) runs
    here too, its input rounded as the reference rounds it (one native pass,
    ``lowbit_cpu::fake_quantize_u8``; the reference rounds in seven torch passes and
    dequantizes the weight with the general primitives). ``benchmarks/conv_speed.py`` on the
    AVX2 path of a 2-core AMD EPYC (2 threads, 5 alternating rounds, x the faster float32):
    upconv7 at 256x256 x0.55 on the reference path, x0.92 here (W8 weight-only x1.00); the
    DCGAN x0.39 -> x0.79 (batch 1), x0.72 -> x0.78 (16). (Before lowbit's AVX2 integer
    convolution, every W8A8 convolution ran here on such CPUs.)
    """
    parts = affine_parts(layer, inputs=True)
    if parts is None:
        return None
    codes, scale, offset, block, bits = parts
    g = layer.geometry
    rounding = None
    if layer.act is not None:  # one static range (affine_parts checked), resolved once here
        static = QParams(layer.act_scale, layer.act_zero)  # (tensor_qparams reads no input then)
        rounding = (layer.act, tensor_qparams(layer.act_scale, layer.act, static))
    if not (g.transposed and g.groups == 1 and block[1] == codes.shape[1]):
        return AffineKernelConv(to_affine(*parts), g, layer.bias, rounding=rounding)
    taps = g.kernel_size[0] * g.kernel_size[1]
    columns = codes.reshape(g.out_channels, g.in_channels, taps).transpose(1, 2)
    per_row = [p.repeat_interleave(block[0], 0).repeat_interleave(taps, 0)
               for p in (scale, offset)]  # fmt: skip
    aw = to_affine(columns.reshape(-1, g.in_channels), *per_row, (1, g.in_channels), bits)
    return AffineKernelConv(aw, g, layer.bias, columns=True, rounding=rounding)


__all__ = ["AffineKernelConv", "affine_conv_module"]

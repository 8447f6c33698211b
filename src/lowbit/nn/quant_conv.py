"""Quantized convolutions: the packed storage of :class:`QuantLinear`, a convolution's forward.

A convolution is quantized as the matrix it multiplies im2col patches by: one row per output
channel, its inputs (input channels of the group x kernel positions) along the row. So every
weight format, granularity (per output channel, or groups along that row), observer, algorithm
and packing of linears applies unchanged; :class:`ConvGeometry` maps the weight to that matrix
and back. ``nn.ConvTranspose2d`` stores its weight (in, out, kh, kw): its matrix is the
transpose over the first two axes (groups of 1 only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import ActivationSpec
from lowbit.nn.quant_linear import QuantLinear
from lowbit.primitives import QuantizedWeight

CONVS = (nn.Conv2d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D (transposed) convolution needs besides its weight."""

    transposed: bool
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    output_padding: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, conv: nn.Module, name: str = "") -> ConvGeometry:
        if type(conv) not in CONVS:
            raise LowbitError(f"{name}: {type(conv).__name__} is not a Conv2d/ConvTranspose2d")
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            mode = f"{conv.padding!r} / {conv.padding_mode!r}"
            raise LowbitError(f"{name}: padding {mode} is not supported; pad explicitly and "
                              f"use numeric zero padding")  # fmt: skip
        transposed = isinstance(conv, nn.ConvTranspose2d)
        if transposed and conv.groups != 1:
            raise LowbitError(f"{name}: grouped transposed convolutions are not supported; add "
                              f"the layer to ignore")  # fmt: skip
        extra = {"output_padding": tuple(conv.output_padding)} if transposed else {}
        return cls(transposed, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                   tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                   **extra)  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the matrix: output channels, inputs per output channel."""
        kh, kw = self.kernel_size
        return self.out_channels, self.in_channels // self.groups * kh * kw

    def matrix(self, weight: Tensor) -> Tensor:
        """The conv weight as the (out, in_per_group * kh * kw) matrix that is quantized."""
        if self.transposed:  # (in, out, kh, kw) -> (out, in, kh, kw)
            weight = weight.transpose(0, 1)
        return weight.reshape(self.shape)

    def weight(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`matrix`."""
        kh, kw = self.kernel_size
        w = matrix.reshape(self.out_channels, self.in_channels // self.groups, kh, kw)
        return w.transpose(0, 1) if self.transposed else w

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.transposed:
            return F.conv_transpose2d(x, weight, bias, self.stride, self.padding,
                                      self.output_padding, self.groups, self.dilation)  # fmt: skip
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def patches(self, x: Tensor) -> Tensor:
        """The im2col rows (N·L, columns of :attr:`shape`) that the matrix multiplies: the
        convolution is ``patches(x) @ matrix(w).T`` (each row one output position). Groups of 1
        only."""
        if self.transposed:
            cols = self._spread_columns(x)  # (N, C, kh, kw, H', W')
            c, kh, kw = cols.shape[1:4]
            return cols.permute(0, 4, 5, 1, 2, 3).reshape(-1, c * kh * kw)
        self._ungrouped()
        kh, kw = self.kernel_size
        cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # fmt: skip
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def gram(self, x: Tensor) -> tuple[Tensor, int]:
        """``(P.T @ P, rows)`` for ``P = patches(x)`` in float32 (GPTQ's Hessian sums). For a
        transposed convolution with a stride, each phase of output positions reads only its own
        kernel taps (its other columns hold the zeros spread between pixels), so the products are
        taken per phase: at stride 2, four phases of a quarter of the columns, 4x fewer."""
        if not self.transposed or self.stride == (1, 1):
            rows = self.patches(x).float()
            return rows.T @ rows, rows.shape[0]
        cols = self._spread_columns(x.float(), flip=False)  # tap a' is column kh-1-a'
        n, c, kh, kw, oh, ow = cols.shape
        index = torch.arange(c * kh * kw).reshape(c, kh, kw)
        out = x.new_zeros(c * kh * kw, c * kh * kw, dtype=torch.float32)
        (sh, sw), (dh, dw) = self.stride, self.dilation
        top, left = dh * (kh - 1) - self.padding[0], dw * (kw - 1) - self.padding[1]
        for py in range(min(sh, oh)):
            for px in range(min(sw, ow)):
                # tap a' reads spread row oy + a'·dh - top: a pixel iff divisible by the stride
                ta = [a for a in range(kh) if (py + a * dh - top) % sh == 0]
                tb = [b for b in range(kw) if (px + b * dw - left) % sw == 0]
                if not ta or not tb:
                    continue
                sub = cols[:, :, ta][:, :, :, tb][..., py::sh, px::sw]
                rows = sub.permute(0, 4, 5, 1, 2, 3).reshape(-1, c * len(ta) * len(tb))
                flipped = index[:, [kh - 1 - a for a in ta]][:, :, [kw - 1 - b for b in tb]]
                idx = flipped.reshape(-1)
                out[idx.unsqueeze(1), idx.unsqueeze(0)] += rows.T @ rows
        return out, n * oh * ow

    def _ungrouped(self) -> None:
        if self.groups != 1:
            raise LowbitError("grouped convolutions have one input matrix per group")

    def _spread_columns(self, x: Tensor, flip: bool = True) -> Tensor:
        """A transposed convolution's patches as (N, C, kh, kw, H', W'): it is a plain
        convolution over the input spread by the stride (zeros between pixels), padded by
        dilation·(k−1)−padding (+ output_padding at the end; a negative pad crops), with the
        kernel flipped."""
        kh, kw = self.kernel_size
        n, c, h, w = x.shape
        (sh, sw), (dh, dw), (ph, pw) = self.stride, self.dilation, self.padding
        spread = x.new_zeros(n, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
        spread[:, :, ::sh, ::sw] = x
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
        oph, opw = self.output_padding
        spread = F.pad(spread, (left, left + opw, top, top + oph))
        oh, ow = spread.shape[-2] - dh * (kh - 1), spread.shape[-1] - dw * (kw - 1)
        cols = F.unfold(spread, (kh, kw), dilation=self.dilation)
        cols = cols.reshape(n, c, kh, kw, oh, ow)
        return cols.flip(2, 3) if flip else cols

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "conv") -> ConvGeometry:
        """Inverse of :meth:`to_dict` (a manifest entry), checked: one error naming the key."""
        if not isinstance(data, dict):
            raise LowbitError(f"{where}: expected a mapping")
        out: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name)
            if f.name == "transposed":
                ok = isinstance(value, bool)
            elif f.name in ("in_channels", "out_channels", "groups"):
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            else:
                ok = (isinstance(value, list | tuple) and len(value) == 2 and
                      all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                          for v in value))  # fmt: skip
                value = tuple(value) if ok else value
            if not ok:
                raise LowbitError(f"{where}.{f.name}: unexpected value {value!r}")
            out[f.name] = value
        geometry = cls(**out)
        if geometry.in_channels % geometry.groups or geometry.out_channels % geometry.groups:
            raise LowbitError(f"{where}: channels not divisible by groups {geometry.groups}")
        if geometry.transposed and geometry.groups != 1:
            raise LowbitError(f"{where}: grouped transposed convolutions are not supported")
        if 0 in (*geometry.kernel_size, *geometry.stride, *geometry.dilation):
            raise LowbitError(f"{where}: kernel, stride and dilation must be at least 1")
        return geometry


class QuantConv(QuantLinear):
    """Drop-in replacement for ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with quantized, packed
    weights (the matrix of :class:`ConvGeometry`). Activations, if any, are rounded per tensor
    (dynamic or static): a per-token range has no meaning for an image."""

    def __init__(self, geometry: ConvGeometry, *args, **kwargs) -> None:
        rows, cols = geometry.shape
        super().__init__(cols, rows, *args, **kwargs)
        self.geometry = geometry
        if self.act is not None and self.act.granularity != "tensor":
            layer = kwargs.get("layer", "")
            raise LowbitError(f"{layer}: activations of a convolution are rounded per tensor; "
                              f"set activations: {{granularity: tensor}}")  # fmt: skip

    @classmethod
    def from_conv(cls, conv: nn.Module, qw: QuantizedWeight, layer: str = "",
                  act: ActivationSpec | None = None) -> QuantConv:  # fmt: skip
        """Pack an algorithm's output for the matrix of ``conv``."""
        geometry = ConvGeometry.of(conv, layer)
        flat = QuantLinear.from_quantized(qw, conv.bias, layer, None)
        dtype = torch.float32 if conv.bias is None else conv.bias.dtype
        mod = cls(geometry, qw.spec, conv.bias is not None, dtype, layer=layer, act=act)
        mod.load_state_dict(flat.state_dict(), strict=False)
        return mod

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C', H', W')
        weight = self.geometry.weight(self.dequantized_weight(x.dtype))
        return self.geometry.apply(self.quantize_input(x), weight, self.bias)

    def extra_repr(self) -> str:
        g = self.geometry
        kind = "transposed, " if g.transposed else ""
        bias = self.bias is not None
        return (f"{kind}{g.in_channels}, {g.out_channels}, kernel={g.kernel_size}, "
                f"stride={g.stride}, {self.spec.short()}, bias={bias}")  # fmt: skip


def is_conv(module: nn.Module) -> bool:
    return type(module) in CONVS


def layer_dims(module: nn.Module, name: str = "") -> tuple[int, int]:
    """(out, in) of the matrix a layer's weight is quantized as: a linear's own; a
    convolution's output channels by its inputs per output channel (``name``: the layer's,
    for the error where a convolution cannot be quantized)."""
    if is_conv(module):
        return ConvGeometry.of(module, name).shape
    return module.out_features, module.in_features


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer's weight matrix multiplies: a linear's inputs (rows, in); a
    convolution's im2col patches (:meth:`ConvGeometry.patches`)."""
    if is_conv(module):
        return ConvGeometry.of(module).patches(x)
    return x.reshape(-1, x.shape[-1])


def input_gram(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``(R.T @ R, rows)`` in float32 for ``R = input_rows(module, x)``."""
    if is_conv(module):
        return ConvGeometry.of(module).gram(x)
    rows = input_rows(module, x).float()
    return rows.T @ rows, rows.shape[0]


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as the matrix that is quantized (a view; a linear's own weight)."""
    return ConvGeometry.of(module).matrix(module.weight) if is_conv(module) else module.weight


__all__ = ["CONVS", "ConvGeometry", "QuantConv", "input_gram", "input_rows", "is_conv",
           "layer_dims", "weight_matrix"]  # fmt: skip

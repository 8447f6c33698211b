"""Inference modules that run a :class:`QuantLinear` through a fast kernel, and the load-time swap.

:func:`lowbit.models.use_kernels` replaces each QuantLinear the kernels cover by one of these,
converting its saved packing into the kernel's layout once and dropping the saved copy (so RAM
holds the low-bit form only). They are for inference: save models before the swap, not after.

- ``w4a16`` / ``w8a16``: 4- or 8-bit integer weights, any grid, group-wise (groups a multiple
  of 32) or per-channel, float32 inputs: :mod:`lowbit.kernels.affine` (a convolution's:
  :mod:`lowbit.nn.kernel_conv`, ``w4a16-conv`` / ``w8a16-conv``);
- ``w8a8``: int8 per-channel weights with per-token int8 inputs: :mod:`lowbit.kernels.int8`;
- ``w8a8-linear-tensor``: the same weights with 8-bit per-tensor inputs (static or dynamic), on
  CPUs with VNNI (AVX-512 VNNI or AVX-VNNI): :mod:`lowbit.nn.kernel_tensor`;
- ``fp16`` / ``bf16``: 16-bit float weights (the ``fp16``/``bf16`` formats), float32 inputs:
  :mod:`lowbit.kernels.float_linear`.
Everything else (nf4, fp8, 2/3-bit, odd groups, LoRC-corrected layers, W4A8, other
activation grids) keeps QuantLinear's reference path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.kernels.affine import AffineWeight, affine_linear, supports, to_affine
from lowbit.kernels.float_linear import HALF_DTYPES, float_linear
from lowbit.kernels.int8 import Int8Weight, int8_eligible, int8_linear, prepare_int8
from lowbit.nn.kernel_tensor import tensor_kernel_module
from lowbit.nn.quant_linear import QuantLinear, nbytes
from lowbit.nn.shared_input import SharedInput
from lowbit.primitives import dequantize, grid_of


class AffineKernelLinear(nn.Module):
    """Low-bit integer weights in the affine kernel's layout, float inputs."""

    def __init__(self, aw: AffineWeight, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = aw.in_features, out_features
        self.group, self.bits = aw.group, aw.bits
        self.register_buffer("w", aw.w)
        self.register_buffer("scale", aw.scale)
        self.register_buffer("offset", aw.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.shared: SharedInput | None = None  # set by share_input: one call with siblings
        self.rows = (0, out_features)  # this layer's rows of the shared output
        self._held: AffineWeight | None = None  # affine_weight()'s, while the buffers stay

    @property
    def kind(self) -> str:
        return f"w{self.bits}a16"

    def affine_weight(self) -> AffineWeight:
        """The layer's weight as the kernels take it (one object while its buffers stay)."""
        buffers = self._buffers  # (not through nn.Module's __getattr__: a decode hot path)
        held, w, scale, offset = self._held, buffers["w"], buffers["scale"], buffers["offset"]
        if held is None or held.w is not w or held.scale is not scale or held.offset is not offset:
            held = self._held = AffineWeight(w, scale, offset, self.group, self.bits,
                                             self.in_features)  # fmt: skip
        return held

    def storage_tensors(self) -> tuple[Tensor, ...]:
        return (self.w, self.scale, self.offset)

    def storage_bytes(self) -> dict[str, int]:
        """As :meth:`QuantLinear.storage_bytes`, in this layout (scale and offset as held)."""
        params = nbytes(self.scale, self.offset)
        return {"codes": nbytes(self.w), "params": params, "bias": nbytes(self.bias)}

    def forward(self, x: Tensor) -> Tensor:
        if self.shared is not None:
            y = self.shared.output(x)[..., self.rows[0] : self.rows[1]].contiguous()
        else:
            y = affine_linear(x, self.affine_weight())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        shared = ", shared input" if self.shared is not None else ""
        return f"{self.in_features}, {self.out_features}, {self.kind}, group={self.group}{shared}"


class HalfKernelLinear(nn.Module):
    """16-bit float weights (float16 or bfloat16, as saved), float32 inputs and arithmetic."""

    def __init__(self, w: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.register_buffer("w", w.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def kind(self) -> str:
        return "fp16" if self.w.dtype == torch.float16 else "bf16"

    def storage_tensors(self) -> tuple[Tensor, ...]:
        return (self.w,)

    def storage_bytes(self) -> dict[str, int]:
        return {"codes": nbytes(self.w), "params": 0, "bias": nbytes(self.bias)}

    def forward(self, x: Tensor) -> Tensor:
        y = float_linear(x, self.w)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}"


class Int8KernelLinear(nn.Module):
    """int8 weights × per-token dynamic int8 inputs, held in the layout of this machine's kernel
    (:func:`lowbit.kernels.int8.prepare_int8`)."""

    kind = "w8a8"

    def __init__(self, weight: Int8Weight, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, out_features
        self.weight_int8 = weight  # codes or panels, whichever the kernel reads
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.shared: SharedInput | None = None  # set by share_input: one call with siblings
        self.rows = (0, out_features)  # this layer's rows of the shared output

    def storage_tensors(self) -> tuple[Tensor, ...]:
        held = (self.weight_int8.panels, self.weight_int8.codes)
        return tuple(t for t in held if t is not None)

    def storage_bytes(self) -> dict[str, int]:
        """int8 codes and fp32 per-row scales, as the kernels hold them (panels pad the rows to
        a multiple of 8 and the inputs to a multiple of 4: not counted)."""
        n = self.out_features
        return {"codes": n * self.in_features, "params": 4 * n, "bias": nbytes(self.bias)}

    def forward(self, x: Tensor) -> Tensor:
        if self.shared is not None:
            y = self.shared.output(x)[..., self.rows[0] : self.rows[1]].contiguous()
        else:
            y = int8_linear(x, self.weight_int8)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        shared = ", shared input" if self.shared is not None else ""
        return f"{self.in_features}, {self.out_features}, w8a8{shared}"


def kernel_module(layer: QuantLinear) -> nn.Module | None:
    """The fast module for ``layer``, or None when no kernel covers its format."""
    spec, qt = layer.spec, layer.spec.qtype
    if int8_eligible(spec, layer.act):
        weight = prepare_int8(layer.int8_codes(), layer.scale.reshape(-1))
        return Int8KernelLinear(weight, layer.out_features, layer.bias)
    if layer.act is not None:  # per-tensor grids: oneDNN where exact; others: the reference
        return tensor_kernel_module(layer)
    if qt.kind == "float" and layer.qweight.dtype in HALF_DTYPES and not spec.lorc_rank:
        return HalfKernelLinear(layer.qweight, layer.bias)
    aw = affine_weight(layer)
    return None if aw is None else AffineKernelLinear(aw, layer.out_features, layer.bias)


def affine_weight(layer: QuantLinear) -> AffineWeight | None:
    """The affine kernel's layout of a weight-only integer layer (a QuantConv's matrix too),
    or None when the kernel does not cover its format."""
    parts = affine_parts(layer)
    return None if parts is None else to_affine(*parts)


def one_input_range(layer: QuantLinear) -> bool:
    """Whether the layer's inputs are rounded to one calibrated static per-tensor range of an
    8-bit integer grid (not dynamic, not one range per step slice)."""
    act = layer.act
    return (act is not None and not act.dynamic and act.granularity == "tensor"
            and act.qtype.kind == "int" and act.qtype.bits == 8
            and layer.act_scale is not None and layer.act_scale.numel() == 1
            and not bool(torch.isnan(layer.act_scale).any()))  # fmt: skip


def affine_parts(layer: QuantLinear, inputs: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, tuple, int] | None:  # fmt: skip
    """(unsigned codes (N, K), per-block scale and offset with w = scale·u + offset, block,
    bits) of a weight-only integer layer the affine kernel covers, else None. ``inputs``: also
    of a layer whose inputs are rounded to one static 8-bit range (:func:`one_input_range`;
    the caller rounds them)."""
    spec, qt = layer.spec, layer.spec.qtype
    shape = (layer.out_features, layer.in_features)
    if layer.act is not None and not (inputs and one_input_range(layer)):
        return None
    if qt.kind != "int" or spec.lorc_rank:
        return None
    if not supports(qt.bits, layer.block, shape):
        return None
    qp, grid = layer.qparams(), grid_of(spec)
    rows, cols = layer.scale.shape
    zeros = torch.zeros(rows, cols, 1, dtype=torch.uint8)
    offset = dequantize(zeros, qp, grid)[..., 0]  # w = scale·u + offset on every grid
    scale = dequantize(zeros + 1, qp, grid)[..., 0] - offset
    return layer.codes(), scale, offset, layer.block, qt.bits

"""QuantLinear: a linear layer whose weight is held as packed low-bit codes plus block scales.

Buffers (what is saved and what occupies RAM):
- ``qweight``: int formats: uint8 (out, packed_length(in, bits)), codes packed along the input dim;
  fp8 / fp16 / bf16 formats: the (out, in) tensor in that dtype;
- ``scale``: (out/br, in/bc) in the spec's scale dtype (absent for fp16/bf16); for K-means
  codebook formats (out/br, in/bc, 2**bits): each block's table of values;
- ``zero``: asymmetric int grids only: fp offsets of the same shape (``zero_point: float``) or
  integer codes packed along the block dim (``zero_point: int``);
- ``lorc_u`` (out, r), ``lorc_v`` (r, in): fp16 low-rank error correction when the spec has
  ``lorc_rank`` r > 0 (the layer computes with codes·scales + U·V).
- ``act_scale`` (G,) fp32 and, for asymmetric grids, ``act_zero`` (G,) uint8: layers with static
  activation ranges (``act`` set, ``dynamic: false``), filled by calibration; G is 1, or the
  number of per-step ranges of a diffusion model's layer (:mod:`lowbit.nn.steps`).
The forward pass rounds the inputs when ``act`` is set (per token or per tensor, dynamic or with
the stored static range: :mod:`lowbit.primitives.activations`; int8 per-channel weights with
8-bit symmetric per-token inputs use the int8 reference of :mod:`lowbit.kernels.int8`, equal to
its kernels bit for bit), dequantizes the weight and calls ``F.linear``; the fast kernels
(:func:`lowbit.models.use_kernels`) replace exactly this step, with this as their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.granularity import n_blocks, weight_block
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.kernels.int8 import Int8Weight, int8_eligible, int8_linear_reference
from lowbit.nn.steps import current_range
from lowbit.packing import pack, packed_length, unpack
from lowbit.primitives import QParams, QuantizedWeight, dequantize_weight, grid_of
from lowbit.primitives.activations import fake_quantize_dynamic, fake_quantize_static

PACKED_KINDS = ("int", "nf", "codebook")  # codes packed as uint8 bits (fp8/fp16 are stored as is)


def nbytes(*tensors: Tensor | None) -> int:
    """Bytes held by the given tensors (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` with quantized, packed weight storage."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: WeightSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        layer: str = "",
        act: ActivationSpec | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.act = act
        self.block = weight_block(spec, out_features, in_features, layer)
        qt, grid = spec.qtype, grid_of(spec)
        rows, cols = n_blocks(self.block, out_features, in_features)
        if qt.kind in PACKED_KINDS:
            qshape, qdtype = (out_features, packed_length(in_features, qt.bits)), torch.uint8
        else:
            qshape, qdtype = (out_features, in_features), qt.torch_dtype
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype))
        scale = zero = None
        if qt.kind == "codebook":  # one table of 2**bits values per block
            scale = torch.zeros(rows, cols, qt.levels, dtype=grid.scale_dtype)
        elif spec.has_scale:
            scale = torch.ones(rows, cols, dtype=grid.scale_dtype)
        if spec.has_zero and spec.zero_point == "float":
            zero = torch.zeros(rows, cols, dtype=grid.scale_dtype)
        elif spec.has_zero:
            zero = torch.zeros(rows, packed_length(cols, qt.bits), dtype=torch.uint8)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        r = min(spec.lorc_rank, in_features, out_features)
        self.register_buffer(
            "lorc_u", torch.zeros(out_features, r, dtype=torch.float16) if r else None
        )
        self.register_buffer(
            "lorc_v", torch.zeros(r, in_features, dtype=torch.float16) if r else None
        )
        static = act is not None and act.static
        ranges = act.step_groups if static else 1  # one per slice of a sampler's timesteps
        self.register_buffer("act_scale", torch.full((ranges,), torch.nan) if static else None)
        self.register_buffer(
            "act_zero",
            torch.zeros(ranges, dtype=torch.uint8) if static and not act.symmetric else None,
        )
        if ranges > 1:
            self.step_position: float | None = None  # set by lowbit.nn.select_step
        self.observing = False  # set by activation calibration: inputs pass through unrounded
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Tensor | None = None,
        layer: str = "",
        act: ActivationSpec | None = None,
    ) -> QuantLinear:
        """Pack an algorithm's output into a new module."""
        out_features, in_features = qw.shape
        dtype = bias.dtype if bias is not None else torch.float32
        mod = cls(in_features, out_features, qw.spec, bias is not None, dtype, layer, act)
        bits = qw.spec.qtype.bits
        packs = qw.spec.qtype.kind in PACKED_KINDS
        mod.qweight.copy_(pack(qw.codes, bits) if packs else qw.codes)
        if mod.scale is not None:
            mod.scale.copy_(qw.qparams.scale)
        if mod.zero is not None:
            int_zero = qw.spec.zero_point == "int"
            mod.zero.copy_(pack(qw.qparams.zero, bits) if int_zero else qw.qparams.zero)
        if mod.lorc_u is not None:
            if qw.lorc is None:
                raise ValueError(f"{layer}: the spec asks for LoRC factors; fit them first")
            mod.lorc_u.copy_(qw.lorc[0])
            mod.lorc_v.copy_(qw.lorc[1])
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def codes(self) -> Tensor:
        """Unpacked codes (out, in)."""
        if self.spec.qtype.kind in PACKED_KINDS:
            return unpack(self.qweight, self.spec.qtype.bits, self.in_features)
        return self.qweight

    def qparams(self) -> QParams:
        zero = self.zero
        if zero is not None and self.spec.zero_point == "int":
            zero = unpack(zero, self.spec.qtype.bits, self.scale.shape[1])
        return QParams(self.scale, zero)

    def quantized_weight(self) -> QuantizedWeight:
        lorc = None if self.lorc_u is None else (self.lorc_u, self.lorc_v)
        return QuantizedWeight(self.codes(), self.qparams(), self.spec, self.block, lorc)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in) the layer computes with: the stored codes, plus the LoRC
        correction U·V when it has one."""
        w = dequantize_weight(self.codes(), self.qparams(), self.spec, self.block)
        if self.lorc_u is not None:
            w = w + self.lorc_u.float() @ self.lorc_v.float()
        return w.to(dtype)

    def int8_codes(self) -> Tensor:
        """Signed codes (out, in) as int8 of a symmetric layer of up to 8 bits (u - 2**(b-1))."""
        return (self.codes().to(torch.int16) - self.spec.qtype.mid).to(torch.int8)

    def set_static_range(self, qp: QParams, group: int = 0) -> None:
        """Store a calibrated static activation (scale, zero), of step ``group`` for a layer
        with per-step ranges."""
        self.act_scale[group : group + 1].copy_(qp.scale.reshape(1))
        if self.act_zero is not None:
            self.act_zero[group : group + 1].copy_(qp.zero.reshape(1))

    def static_range(self) -> QParams:
        """The calibrated (scale, zero) the layer's input is rounded with now (of the current
        step group for a layer with per-step ranges)."""
        return current_range(self.act_scale, self.act_zero, getattr(self, "step_position", None),
                             type(self).__name__)  # fmt: skip

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the layer computes with it (rounded to the activation grid, if any)."""
        if self.act is None or self.observing:
            return x
        if self.act.dynamic:
            return fake_quantize_dynamic(x, self.act)
        if torch.isnan(self.act_scale).any():
            raise LowbitError(
                "static activation range not calibrated; quantize with "
                "calibration data (lowbit.pipeline.calibrate_activations)"
            )
        return fake_quantize_static(x, self.static_range(), self.act)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if int8_eligible(self.spec, self.act) and not self.observing:
            w = Int8Weight(self.int8_codes(), self.scale.float().reshape(-1))
            y = int8_linear_reference(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype), self.bias)

    def storage_tensors(self) -> tuple[Tensor, ...]:
        """The tensors that hold the quantized weight (codes, scales, zeros)."""
        held = (self.qweight, self.scale, self.zero, self.lorc_u, self.lorc_v)
        return tuple(t for t in held if t is not None)

    def storage_bytes(self) -> dict[str, int]:
        """Bytes held: ``codes`` (packed weight), ``params`` (scales, zeros and LoRC factors),
        ``bias``."""
        params = nbytes(self.scale, self.zero, self.lorc_u, self.lorc_v)
        return {"codes": nbytes(self.qweight), "params": params, "bias": nbytes(self.bias)}

    def bits_per_weight(self) -> float:
        """Stored bits per weight including scale and zero overhead (bias excluded)."""
        b = self.storage_bytes()
        return 8.0 * (b["codes"] + b["params"]) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        bias, act = self.bias is not None, "" if self.act is None else f", {self.act.short()}"
        return f"{self.in_features}, {self.out_features}, {self.spec.short()}{act}, bias={bias}"

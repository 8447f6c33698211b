"""FakeQuantLinear: a linear layer trained on its quantization grid (QAT), then packed.

The weight stays float and trainable; every forward pass quantizes and dequantizes it with the
straight-through estimator for the rounding, so the loss sees the low-bit weight while the
gradient still reaches the float one. With ``learn_scales`` the per-block scale (and offset, for
asymmetric grids) are parameters too, trained through the same formula (LSQ, Esser et al. 2020;
the offset as in LSQ+; or, with ``lsq`` off, the exact gradient with the codes held fixed).
:meth:`FakeQuantLinear.with_fixed_codes` keeps a packed layer's codes themselves (only its scales
and offsets train: end-to-end tuning, :mod:`lowbit.algorithms.tune`). The
forward pass uses the scale and offset rounded to fp16, as they
will be stored, so :meth:`to_quantized` gives codes whose packed model computes exactly what the
fake-quant model computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.primitives import QParams, QuantizedWeight, choose_qparams, grid_of, weight_range
from lowbit.primitives.activations import fake_quantize_dynamic
from lowbit.primitives.blocks import from_blocks, to_blocks


def _ste(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the forward pass, the gradient of ``x`` in the backward pass."""
    return x + (y - x).detach()


def trains(spec: WeightSpec) -> bool:
    """Whether a layer of ``spec`` has a grid the fake-quantized twin trains: an integer one,
    symmetric or with float offsets."""
    return spec.qtype.kind == "int" and (bool(spec.symmetric) or spec.zero_point == "float")


class FakeQuantLinear(nn.Module):
    """A float linear whose forward pass runs on ``spec``'s integer grid (see module docstring)."""

    def __init__(self, linear: nn.Linear, spec: WeightSpec, layer: str = "",
                 learn_scales: bool = True, act: ActivationSpec | None = None) -> None:  # fmt: skip
        super().__init__()
        if not trains(spec):
            raise LowbitError(f"{layer}: QAT trains integer grids, symmetric or with float "
                              f"offsets (zero_point: float), not {spec.short()}")  # fmt: skip
        self.spec, self.layer, self.act = spec, layer, act
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block = weight_block(spec, linear.out_features, linear.in_features, layer)
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        with torch.no_grad():
            lo, hi = weight_range(self.weight, spec, self.block)
            qp = choose_qparams(lo, hi, grid_of(spec))
        self.scale = nn.Parameter(qp.scale.float(), requires_grad=learn_scales)
        offset = qp.zero.float() if qp.zero is not None else torch.zeros_like(self.scale)
        self.offset = nn.Parameter(offset, requires_grad=learn_scales and not spec.symmetric)
        self.lsq = True
        self.register_buffer("fixed", None)  # blocked codes that never change (signed if sym)

    @classmethod
    def from_quantized(cls, linear: nn.Linear, qw: QuantizedWeight, layer: str = "",
                       act: ActivationSpec | None = None) -> FakeQuantLinear:  # fmt: skip
        """Start from an algorithm's result (GPTQ, RTN...): the float weight is set to its
        dequantized value and the grid to its stored scales, so training starts exactly there.

        Scales and offsets then get the exact gradient of the loss with the codes held fixed
        (``lsq`` off) rather than LSQ's estimate through the rounding: on a well-initialised
        grid LSQ's estimate raised a layer's output error at every learning rate tried, the
        exact one lowered it at every one (lowbit's LKD tests)."""
        fake = cls(linear, qw.spec, layer, True, act)
        fake.lsq = False
        if qw.lorc is not None:
            raise LowbitError(f"{layer}: LoRC-corrected layers cannot be trained; drop lorc_rank")
        with torch.no_grad():
            fake.weight.copy_(qw.dequantize().float())
            fake.scale.copy_(qw.qparams.scale.float())
            if not qw.spec.symmetric:
                fake.offset.copy_(qw.qparams.zero.float())
        return fake

    @classmethod
    def with_fixed_codes(cls, linear: nn.Linear, qw: QuantizedWeight, layer: str = "",
                         act: ActivationSpec | None = None) -> FakeQuantLinear:  # fmt: skip
        """:meth:`from_quantized` with ``qw``'s codes kept as they are whatever the scales do
        (the float weight no longer trains or decides them); :meth:`to_quantized` returns the
        same codes with the trained scales and offsets."""
        fake = cls.from_quantized(linear, qw, layer, act)
        fake.weight = nn.Parameter(fake.weight.new_empty(0), requires_grad=False)  # unused now
        codes = to_blocks(qw.codes.to(torch.int16), fake.block)
        if qw.spec.symmetric:
            codes = codes - qw.spec.qtype.mid
        small = qw.spec.qtype.bits < 8 or qw.spec.symmetric  # fits int8
        fake.fixed = codes.to(torch.int8 if small else torch.int16)
        return fake

    def _params16(self) -> tuple[Tensor, Tensor]:
        """Scale and offset as stored (fp16), with straight-through gradients."""
        dtype = grid_of(self.spec).scale_dtype
        s = self.scale.clamp_min(torch.finfo(dtype).tiny)
        return _ste(s, s.to(dtype).float()), _ste(self.offset, self.offset.to(dtype).float())

    def _codes(self, wb: Tensor, s: Tensor, m: Tensor) -> Tensor:
        """Integer codes of the blocked weight (nR, nC, n): signed for symmetric grids."""
        qt = self.spec.qtype
        if self.spec.symmetric:
            return torch.clamp(_ste(wb / s, torch.round(wb / s)), -qt.mid, qt.sym_max)
        return torch.clamp(_ste((wb - m) / s, torch.round((wb - m) / s)), 0, qt.code_max)

    def fake_weight(self) -> Tensor:
        """The (out, in) weight the layer computes with: on the grid, differentiable."""
        s, m = self._params16()
        s, m = s.unsqueeze(-1), m.unsqueeze(-1)
        if self.fixed is not None:
            u = self.fixed.float()
        elif not self.lsq:  # codes held fixed w.r.t. the grid: the exact gradient of s and m
            u = self._codes(to_blocks(self.weight, self.block), s.detach(), m.detach())
        else:
            u = self._codes(to_blocks(self.weight, self.block), s, m)
        wq = u * s if self.spec.symmetric else u * s + m
        return from_blocks(wq, self.block)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:  # rounded inputs, straight-through; static grids: per tensor
            x = _ste(x, fake_quantize_dynamic(x.detach(), self.act.as_dynamic()))
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The packed form of exactly the weight :meth:`fake_weight` computes."""
        dtype = grid_of(self.spec).scale_dtype
        s16, m16 = self.scale.clamp_min(torch.finfo(dtype).tiny).to(dtype), self.offset.to(dtype)
        if self.fixed is not None:
            u = self.fixed.float()
        else:
            u = self._codes(to_blocks(self.weight, self.block), s16.float().unsqueeze(-1),
                            m16.float().unsqueeze(-1))  # fmt: skip
        if self.spec.symmetric:
            u, qp = u + self.spec.qtype.mid, QParams(s16)
        else:
            qp = QParams(s16, m16)
        codes = from_blocks(u.to(torch.uint8), self.block)
        return QuantizedWeight(codes, qp, self.spec, self.block)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.short()} (fake-quant)"

"""LearnedRoundLinear: a frozen float linear whose rounding and clipping are learned (AutoRound).

The float weight never changes. What learns is, per weight, an offset in grid steps added
before rounding (in [-0.5, 0.5]: it can flip a weight to the other neighbouring code, no
further), and per block two factors in [0.5, 1] on the observer's minimum and maximum (how far
the grid's range shrinks). Rounding passes gradients straight through
(:func:`lowbit.primitives.fake.ste_codes`), and the scale is computed as it will be stored
(fp16), so :meth:`to_quantized` packs exactly the weight the forward pass used.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import ActivationSpec, WeightSpec
from lowbit.primitives import QParams, QuantizedWeight, choose_qparams, dequantize, grid_of
from lowbit.primitives.activations import fake_quantize_dynamic
from lowbit.primitives.blocks import from_blocks, to_blocks
from lowbit.primitives.fake import ste_codes
from lowbit.primitives.observers import observe

SHIFT_LIMIT = 0.5  # an offset may move a weight to the other neighbouring code, no further
RANGE_LIMITS = (0.5, 1.0)  # how far each block's range may shrink, and that it cannot grow


class LearnedRoundLinear(nn.Module):
    """``linear`` on ``spec``'s integer grid with learnable rounding offsets and range factors
    (see module docstring); ``act`` rounds the inputs as the packed layer will."""

    def __init__(self, linear: nn.Linear, spec: WeightSpec, layer: str = "",
                 act: ActivationSpec | None = None) -> None:  # fmt: skip
        super().__init__()
        self.spec, self.layer, self.act, self.grid = spec, layer, act, grid_of(spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block = weight_block(spec, linear.out_features, linear.in_features, layer)
        wb = to_blocks(linear.weight.detach().float(), self.block)
        lo, hi = observe(wb, spec.observer, self.grid)
        self.register_buffer("wb", wb)
        self.register_buffer("lo", lo.float())
        self.register_buffer("hi", hi.float())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.shift = nn.Parameter(torch.zeros_like(wb))
        self.low = nn.Parameter(torch.ones_like(self.lo))
        self.high = nn.Parameter(torch.ones_like(self.hi))

    @torch.no_grad()
    def project(self) -> None:
        """Put the parameters back inside their limits (after an optimiser step)."""
        self.shift.clamp_(-SHIFT_LIMIT, SHIFT_LIMIT)
        self.low.clamp_(*RANGE_LIMITS)
        self.high.clamp_(*RANGE_LIMITS)

    def qparams(self) -> QParams:
        """The stored (fp16) scale and offset, with gradients taken in float32: a
        differentiable cast to fp16 would round the gradients to fp16 too, and the small ones
        (wide layers) to zero, freezing the range factors without a word."""
        with torch.no_grad():
            stored = self._stored()
        lo, hi = self.lo * self.low, self.hi * self.high
        exact = choose_qparams(lo, hi, dataclasses.replace(self.grid, scale_dtype=torch.float32))
        scale = exact.scale + (stored.scale.float() - exact.scale).detach()
        zero = stored.zero
        if zero is not None and zero.is_floating_point():  # a float offset (else integer codes)
            zero = exact.zero + (zero.float() - exact.zero).detach()
        return QParams(scale, zero)

    def _stored(self) -> QParams:
        """The scale and offset as they are stored (fp16)."""
        return choose_qparams(self.lo * self.low, self.hi * self.high, self.grid)

    def fake_weight(self) -> Tensor:
        """The (out, in) weight the layer computes with: on the grid, differentiable."""
        qp = self.qparams()
        return from_blocks(dequantize(ste_codes(self.wb, qp, self.grid, self.shift), qp, self.grid),
                           self.block)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:  # rounded inputs (straight through), as the packed layer's
            x = x + (fake_quantize_dynamic(x.detach(), self.act.as_dynamic()) - x).detach()
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The packed form of exactly the weight :meth:`fake_weight` computes."""
        qp = self._stored()  # the forward pass's values exactly (see qparams)
        codes = ste_codes(self.wb, qp, self.grid, self.shift).to(torch.uint8)
        return QuantizedWeight(from_blocks(codes, self.block), qp, self.spec, self.block)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.short()} (learned rounding)"

"""A quantized weight matrix as algorithms produce it: unpacked codes + per-block params + spec.

:func:`quantize_weight` is round-to-nearest on the spec's grid with the spec's range observer
(or a range the caller chose); calibrated algorithms build their own codes and hand back the same
:class:`QuantizedWeight`, which :class:`lowbit.nn.QuantLinear` packs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.granularity import weight_block
from lowbit.formats.spec import WeightSpec
from lowbit.primitives.blocks import from_blocks, to_blocks
from lowbit.primitives.metrics import all_finite
from lowbit.primitives.observers import observe
from lowbit.primitives.qparams import Grid, QParams, choose_qparams, dequantize, quantize

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def grid_of(spec: WeightSpec) -> Grid:
    """The code convention a weight spec implies."""
    return Grid(spec.qtype, bool(spec.symmetric), spec.zero_point, _SCALE_DTYPES[spec.scale_dtype])


@dataclass
class QuantizedWeight:
    """Codes (out, in), per-block ``qparams`` of shape (out/br, in/bc), the spec and block;
    ``lorc``: optional fp16 low-rank correction factors (U (out, r), V (r, in))."""

    codes: Tensor
    qparams: QParams
    spec: WeightSpec
    block: tuple
    lorc: tuple[Tensor, Tensor] | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)

    def dequantize_codes(self) -> Tensor:
        """The float32 weight the codes alone stand for, shape (out, in)."""
        return dequantize_weight(self.codes, self.qparams, self.spec, self.block)

    def dequantize(self) -> Tensor:
        """The float32 weight the layer computes with (codes, plus the LoRC correction)."""
        w = self.dequantize_codes()
        return w if self.lorc is None else w + self.lorc[0].float() @ self.lorc[1].float()


def dequantize_weight(codes: Tensor, qp: QParams, spec: WeightSpec, block: tuple) -> Tensor:
    """Float32 (out, in) weight from unpacked codes and per-block params."""
    grid = grid_of(spec)
    if grid.qtype.kind == "float":
        return codes.float()
    return from_blocks(dequantize(to_blocks(codes, block), qp, grid), block)


def weight_range(w: Tensor, spec: WeightSpec, block: tuple) -> tuple[Tensor, Tensor]:
    """(lo, hi) per block from the spec's observer."""
    return observe(to_blocks(w.detach().float(), block), spec.observer, grid_of(spec))


def quantize_weight(
    w: Tensor,
    spec: WeightSpec,
    layer: str = "",
    lo: Tensor | None = None,
    hi: Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (out, in); the range comes from the observer
    unless ``lo``/``hi`` (shape of the scale tensor) are given."""
    if w.dim() != 2:
        raise LowbitError(f"{layer or 'weight'}: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    if not all_finite(w):
        raise LowbitError(f"{layer or 'weight'}: weight contains NaN or inf")
    block = weight_block(spec, w.shape[0], w.shape[1], layer)
    grid = grid_of(spec)
    if grid.qtype.kind == "float":
        return QuantizedWeight(w.to(grid.qtype.torch_dtype), QParams(None), spec, block)
    if grid.qtype.kind == "codebook":
        raise LowbitError(f"{layer or 'weight'}: kmeans codebooks are fitted by algorithm: kmeans")
    xb = to_blocks(w, block)  # (nR, nC, br*bc)
    if lo is None or hi is None:
        lo, hi = observe(xb, spec.observer, grid)
    qp = choose_qparams(lo, hi, grid)
    codes = from_blocks(quantize(xb, qp, grid), block)
    return QuantizedWeight(codes, qp, spec, block)

"""Low-rank error compensation (LoRC, ZeroQuant-V2): a rank-r correction of the weight error.

After a layer is quantized, the error E = W − Ŵ is approximated by its best rank-r factors from
the SVD, E ≈ U·V with U (out, r) and V (r, in) stored in fp16; the layer then computes
x·(Ŵ + U·V)ᵀ. The singular values are split evenly (U = U_r·√S, V = √S·V_rᵀ) so both factors
have the same scale, which keeps fp16 rounding small. Costs 16·r·(out + in) bits per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.primitives import QuantizedWeight


def lorc_factors(weight: Tensor, quantized: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """fp16 (U (out, r), V (r, in)) with U·V the best rank-``rank`` fit of weight − quantized."""
    err = weight.detach().float() - quantized.detach().float()  # (out, in)
    rank = min(rank, *err.shape)
    u, s, vh = torch.linalg.svd(err, full_matrices=False)  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).half(), (root.unsqueeze(1) * vh[:rank]).half()


def with_lorc(qw: QuantizedWeight, weight: Tensor) -> QuantizedWeight:
    """``qw`` with the LoRC factors its spec asks for (``lorc_rank``), fitted against the float
    ``weight`` it came from; unchanged when the rank is 0."""
    if qw.spec.lorc_rank <= 0:
        return qw
    qw.lorc = lorc_factors(weight, qw.dequantize_codes(), qw.spec.lorc_rank)
    return qw

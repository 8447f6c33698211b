"""Error measures between a tensor and its quantized version."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖x‖² / ‖x − x̂‖²) in dB (inf if exact)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """‖x − x̂‖ / ‖x‖ (Frobenius)."""
    ref = reference.detach().double()
    return (torch.linalg.vector_norm(ref - approx.detach().double()) /
            torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()  # fmt: skip

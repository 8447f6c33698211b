"""KL(fp ‖ q) of next-token distributions against stored reference log-probabilities.

The reference log-probs are kept in float32 (a 49k vocabulary over 1,024 tokens is 200 MB): in
float16 their rounding hid small damages (a tiny test model's 4- and 8-bit layers measured 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.modules import forward_logits


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: Tensor, batch_size: int = 4) -> list[Tensor]:
    """Log-probs (B, T, V) in float32 for each batch of ``windows``."""
    return [F.log_softmax(forward_logits(model, windows[i : i + batch_size]).float(), -1)
            for i in range(0, len(windows), batch_size)]  # fmt: skip


@torch.no_grad()
def mean_kl(model: nn.Module, windows: Tensor, ref: list[Tensor], batch_size: int = 4) -> float:
    """Mean over tokens of KL(ref ‖ model)."""
    total, count = 0.0, 0
    for i, r in zip(range(0, len(windows), batch_size), ref, strict=True):
        logq = F.log_softmax(forward_logits(model, windows[i : i + batch_size]).float(), -1)
        if logq.shape[-1] != r.shape[-1]:
            raise LowbitError(f"the model scores {logq.shape[-1]} tokens and the reference "
                              f"{r.shape[-1]}: they do not share a vocabulary (is it a "
                              f"quantized form of the reference?)")  # fmt: skip
        total += float((r.exp() * (r - logq)).sum(-1).double().sum())
        count += r.shape[0] * r.shape[1]
    return total / max(count, 1)

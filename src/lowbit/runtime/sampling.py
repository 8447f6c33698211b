"""Choosing the next token from logits: greedy, or temperature with top-k / top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted
    to the ``top_k`` most likely tokens (0: all) and to the smallest set whose probability
    reaches ``top_p``, drawn from a generator seeded with ``seed`` (None: fresh entropy)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise LowbitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LowbitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LowbitError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
            return gen
        return gen.manual_seed(self.seed)


def next_tokens(logits: Tensor, sampling: Sampling, gen: torch.Generator | None) -> Tensor:
    """logits (B, vocab) -> token ids (B,). Any temperature > 0 and top_p in (0, 1] give a
    valid draw: the scores are shifted so that the best is 0 and kept in float64 (a tiny
    temperature sends the others to -inf rather than the best to inf, and a tiny top_p still
    keeps the first token), so no request's settings can make the draw fail."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = logits.double()
    scores = (scores - scores.amax(-1, keepdim=True)) / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        cum = ordered.softmax(-1).cumsum(-1)
        drop = cum - ordered.softmax(-1) >= sampling.top_p  # keep the first token past top_p
        drop[:, 0] = False  # (the most likely one always stays)
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

"""A static key/value cache: every layer's keys and values preallocated for a fixed capacity.

Why not transformers' caches: the decode loop of :mod:`lowbit.runtime.llama` writes one slot per
step into tensors whose shapes never change (no concatenation, no reallocation), which is what
lets a whole decode step run as one captured graph; transformers' ``StaticCache`` does this
behind its model forward, whose per-token Python overhead is what this runtime removes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError


class Slots:
    """The context's bookkeeping, shared by every cache: ``capacity`` slots, ``length`` filled
    (the same for every row: padding is on the left), ``pad`` (batch,) left-padding slots per
    row (prompts of different lengths in one batch; never attended to)."""

    def __init__(self, batch: int, capacity: int, device: torch.device | str = "cpu") -> None:
        self.capacity = capacity
        self.length = 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.pad.shape[0]

    def reserve(self, tokens: int) -> int:
        """Claim the next ``tokens`` slots; returns the first one."""
        start = self.length
        if start + tokens > self.capacity:
            raise LowbitError(
                f"the context holds {self.capacity} tokens; {start + tokens} were asked for "
                "(use a shorter prompt or fewer new tokens)"
            )
        self.length = start + tokens
        return start


class StaticKVCache(Slots):
    """Keys and values (layers, batch, kv_heads, capacity, head_dim), preallocated."""

    def __init__(
        self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        super().__init__(batch, capacity, device)
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def bytes_per_token(self) -> int:
        """Bytes one more token of context costs (every layer's key and value, every row)."""
        layers, batch, heads, _, dim = self.k.shape
        return 2 * layers * batch * heads * dim * self.k.element_size()

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, kv_heads, t, head_dim) at ``start``; the layer's filled prefix."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CacheView(StaticKVCache):
    """Rows ``rows`` of ``base`` (views: what is written lands in ``base``). Its length is the
    base's, or with ``length`` its own (a prompt prefilled into one row ending at the base's
    current length, while the other rows wait)."""

    def __init__(self, base: StaticKVCache, rows: slice, length: int | None = None) -> None:
        self.base, self.capacity, self._own = base, base.capacity, length
        self.k, self.v, self.pad = base.k[:, rows], base.v[:, rows], base.pad[rows]

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.base.length if self._own is None else self._own

    @length.setter
    def length(self, value: int) -> None:
        if self._own is None:
            self.base.length = value
        else:
            self._own = value


def shift(cache: StaticKVCache, rows: int, by: int) -> None:
    """Move the filled slots of the first ``rows`` rows ``by`` slots right (> 0, making room
    on the left for a longer prompt) or left (< 0, dropping padding every row has); positions
    (slot - pad) are unchanged, so the keys' rotary phases stay right."""
    n = cache.length
    if by > 0:
        cache.k[:, :rows, :, by : by + n] = cache.k[:, :rows, :, :n].clone()
        cache.v[:, :rows, :, by : by + n] = cache.v[:, :rows, :, :n].clone()
    elif by < 0:
        cache.k[:, :rows, :, : n + by] = cache.k[:, :rows, :, -by:n].clone()
        cache.v[:, :rows, :, : n + by] = cache.v[:, :rows, :, -by:n].clone()
    cache.pad[:rows] += by
    cache.length = n + by


def move_row(cache: StaticKVCache, source: int, target: int) -> None:
    """Copy row ``source``'s filled slots and padding into row ``target``."""
    n = cache.length
    cache.k[:, target, :, :n] = cache.k[:, source, :, :n]
    cache.v[:, target, :, :n] = cache.v[:, source, :, :n]
    cache.pad[target] = cache.pad[source]


def grown(cache: StaticKVCache, new: StaticKVCache) -> StaticKVCache:
    """``new`` (more capacity, same rows) holding ``cache``'s filled slots."""
    n = cache.length
    new.k[:, :, :, :n] = cache.k[:, :, :, :n]
    new.v[:, :, :, :n] = cache.v[:, :, :, :n]
    new.pad.copy_(cache.pad)
    new.length = n
    return new

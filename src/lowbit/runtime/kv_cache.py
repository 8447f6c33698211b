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
from lowbit.primitives.kv import cache_values, decode_heads, encode_heads


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
    """Keys and values (layers, batch, kv_heads, capacity, head_dim), preallocated.

    ``tensors`` is everything the cache stores, each indexed (layer, row, head, slot, ...):
    what moving rows and slots (:func:`shift`, :func:`move_row`, :func:`grown`) acts on."""

    def __init__(
        self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        read_as: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__(batch, capacity, device)
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
        self.read_as = read_as or dtype  # what attention reads (a float16 cache of a float32 model)

    @property
    def k(self) -> Tensor:
        return self.tensors[0]

    @property
    def v(self) -> Tensor:
        return self.tensors[1]

    def bytes_per_token(self) -> int:
        """Bytes one more token of context costs (every layer's key and value, every row)."""
        return sum(t[:, :, :, 0].numel() * t.element_size() for t in self.tensors)

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, kv_heads, t, head_dim) at ``start``; the layer's filled prefix
        (as attention reads it: float)."""
        end = start + k.shape[2]
        n = len(self.tensors) // 2  # stored tensors per side (keys first, then values)
        out = []
        for side, x in enumerate((k, v)):
            stored = self.tensors[side * n : (side + 1) * n]
            for target, value in zip(stored, self._encode(x), strict=True):
                target[layer, :, :, start:end] = value
            out.append(self._decode([t[layer, :, :, :end] for t in stored]))
        return out[0], out[1]

    def layer(self, index: int) -> list[Tensor]:
        """Every tensor the cache stores for layer ``index`` (keys' first, then values')."""
        return [t[index] for t in self.tensors]

    def _encode(self, x: Tensor) -> list[Tensor]:
        """What is stored for x (batch, kv_heads, t, head_dim)."""
        return [cache_values(x, self.tensors[0].dtype)]

    def _decode(self, stored: list[Tensor]) -> Tensor:
        return stored[0].to(self.read_as)


class QuantKVCache(StaticKVCache):
    """Keys and values stored as ``bits``-bit codes (two per byte up to 4 bits) with a float16
    scale and minimum per token, head and ``group`` channels (:mod:`lowbit.primitives.kv`);
    a prompt's attention reads the filled prefix dequantized to float32, a decode step's reads
    the codes (:func:`lowbit.kernels.kv_attention.decode_attention_codes`)."""

    def __init__(
        self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
        bits: int, group: int, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        Slots.__init__(self, batch, capacity, device)
        self.bits, self.group, self.packed = bits, group, bits <= 4
        lead = (layers, batch, kv_heads, capacity)
        shapes = [
            (*lead, head_dim // 2 if self.packed else head_dim),
            (*lead, head_dim // group),
            (*lead, head_dim // group),
        ]  # fmt: skip  (codes, scale, minimum)
        dtypes = [torch.uint8, torch.float16, torch.float16]
        pairs = list(zip(shapes, dtypes, strict=True)) * 2  # keys, then values
        self.tensors = [torch.zeros(shape, dtype=dt, device=device) for shape, dt in pairs]

    def _encode(self, x: Tensor) -> list[Tensor]:
        return encode_heads(x, self.bits, self.group)

    def _decode(self, stored: list[Tensor]) -> Tensor:
        return decode_heads(*stored, self.bits)


class CacheView(StaticKVCache):
    """Rows ``rows`` of ``base`` (views: what is written lands in ``base``). Its length is the
    base's, or with ``length`` its own (a prompt prefilled into one row ending at the base's
    current length, while the other rows wait)."""

    def __init__(self, base: StaticKVCache, rows: slice, length: int | None = None) -> None:
        self.base, self.capacity, self._own = base, base.capacity, length
        self.tensors, self.pad = [t[:, rows] for t in base.tensors], base.pad[rows]
        self._encode, self._decode = base._encode, base._decode  # the base's way of storing

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
    for t in cache.tensors:
        if by > 0:
            t[:, :rows, :, by : by + n] = t[:, :rows, :, :n].clone()
        elif by < 0:
            t[:, :rows, :, : n + by] = t[:, :rows, :, -by:n].clone()
    cache.pad[:rows] += by
    cache.length = n + by


def move_row(cache: StaticKVCache, source: int, target: int) -> None:
    """Copy row ``source``'s filled slots and padding into row ``target``."""
    n = cache.length
    for t in cache.tensors:
        t[:, target, :, :n] = t[:, source, :, :n]
    cache.pad[target] = cache.pad[source]


def grown(cache: StaticKVCache, new: StaticKVCache) -> StaticKVCache:
    """``new`` (more capacity, same rows, same kind) holding ``cache``'s filled slots."""
    n = cache.length
    for old, t in zip(cache.tensors, new.tensors, strict=True):
        t[:, :, :, :n] = old[:, :, :, :n]
    new.pad.copy_(cache.pad)
    new.length = n
    return new

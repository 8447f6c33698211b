"""Continuous batching: prompts join and leave a running batch between decode steps.

One static KV cache of ``rows`` rows. The running rows are kept in cache rows 0..n-1 and share
one slot cursor (``length``); each row's text lies in ``[pad, length)``. A prompt of ``p``
tokens joins in row n with ``pad = length - p``: it is prefilled alone, into that row only,
ending at the cursor (a longer prompt first moves the running rows right to make room). Each
step then decodes one token for every running row (a view of rows 0..n-1, so idle rows cost
nothing). A finished row is replaced by the last running one. When the cursor reaches the
end of the cache, the cache grows (up to the model's context) or every running row is moved
left by the padding all of them have, which is never zero then: a row only runs while its
prompt and tokens fit the context.

Only the compact forward (:class:`lowbit.runtime.llama.LlamaForward`) writes a cache by rows;
:meth:`lowbit.runtime.Runtime.continuous` returns None for the others, whose requests run as
whole batches through :meth:`lowbit.runtime.Runtime.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.runtime.kv_cache import CacheView, StaticKVCache, grown, move_row, shift
from lowbit.runtime.llama import LlamaForward
from lowbit.runtime.sampling import Sampling, next_tokens

LogitsHook = Callable[[list[Hashable], Tensor], None]  # row keys, their logits (n, vocab)


@dataclass
class Event:
    """What happened to one row: a new ``token`` (None: none kept) and, when it ended, why:
    ``stop`` (a stop token, not kept) or ``length`` (its limit reached)."""

    key: Hashable
    token: int | None
    finish: str | None = None


@dataclass
class _Row:
    key: Hashable
    limit: int
    sampling: Sampling
    generator: torch.Generator | None  # its own: a seeded request draws what it would alone
    made: int = 0
    last: int = 0  # the token fed at the next step


class ContinuousBatch:
    """Rows that join (:meth:`join`) and leave (:meth:`leave`, or by finishing) between
    decode steps (:meth:`step`). ``context`` is the most slots the cache may grow to. Each row
    has its own sampling settings and generator (greedy rows take the argmax)."""

    def __init__(self, forward: LlamaForward, rows: int, context: int,
                 stop_ids: Sequence[int] = (), start: int = 256) -> None:  # fmt: skip
        self.forward, self.rows, self.context = forward, rows, context
        self.stops = set(stop_ids)
        self.cache: StaticKVCache = forward.new_cache(rows, min(start, context))
        self.running: list[_Row] = []

    @property
    def empty(self) -> bool:
        return not self.running

    def fits(self, prompt: int, limit: int) -> bool:
        """Whether a prompt of ``prompt`` tokens asking for ``limit`` may join now."""
        return len(self.running) < self.rows and prompt + limit <= self.context

    @torch.inference_mode()
    def join(self, key: Hashable, ids: Sequence[int], limit: int, sampling: Sampling | None = None,
             on_logits: LogitsHook | None = None) -> Event:  # fmt: skip
        """Prefill ``ids`` into a free row; the first token's event (the row runs on unless
        that event ends it)."""
        if not self.fits(len(ids), limit):
            raise ValueError("no room for this prompt: check fits() first")
        n, p = len(self.running), len(ids)
        if n == 0:
            self.cache.length = 0
        self._room(max(self.cache.length, p) + 1)
        cache = self.cache
        end = max(cache.length, p)
        if n and end > cache.length:  # the running rows move right by the difference
            shift(cache, n, end - cache.length)
        cache.length = end
        cache.pad[n] = end - p
        view = CacheView(cache, slice(n, n + 1), length=end - p)
        logits = self.forward(torch.tensor([list(ids)]), view)  # (1, vocab)
        if on_logits is not None:
            on_logits([key], logits)
        sampling = sampling or Sampling()
        row = _Row(key, limit, sampling, None if sampling.greedy else sampling.generator())
        event = self._record(row, int(next_tokens(logits, sampling, row.generator)[0]))
        if event.finish is None:
            self.running.append(row)
        return event

    @torch.inference_mode()
    def step(self, on_logits: LogitsHook | None = None) -> list[Event]:
        """One token for every running row; finished rows leave."""
        n = len(self.running)
        if n == 0:
            return []
        self._room(self.cache.length + 1)
        ids = torch.tensor([[r.last] for r in self.running])  # (n, 1)
        logits = self.forward(ids, CacheView(self.cache, slice(0, n)))  # (n, vocab)
        if on_logits is not None:
            on_logits([r.key for r in self.running], logits)
        chosen = logits.argmax(-1).tolist()
        for i, r in enumerate(self.running):
            if r.generator is not None:
                chosen[i] = int(next_tokens(logits[i : i + 1], r.sampling, r.generator)[0])
        events = [self._record(r, t) for r, t in zip(self.running, chosen, strict=True)]
        for event in events:
            if event.finish is not None:
                self.leave(event.key)
        return events

    def leave(self, key: Hashable) -> None:
        """Take a row out (finished or cancelled); the last running row takes its place."""
        i = next(i for i, r in enumerate(self.running) if r.key == key)
        last = len(self.running) - 1
        if i != last:
            move_row(self.cache, last, i)
            self.running[i] = self.running[last]
        self.running.pop()

    def _record(self, row: _Row, token: int) -> Event:
        if token in self.stops:
            return Event(row.key, None, "stop")
        row.made, row.last = row.made + 1, token
        return Event(row.key, token, "length" if row.made >= row.limit else None)

    def _room(self, slots: int) -> None:
        """Make the cache hold ``slots`` slots: grow it, else move the running rows left."""
        cache = self.cache
        if slots <= cache.capacity:
            return
        if cache.capacity < self.context:
            size = min(self.context, max(slots, 2 * cache.capacity))
            self.cache = grown(cache, self.forward.new_cache(self.rows, size))
            return
        n = len(self.running)
        common = int(cache.pad[:n].min()) if n else cache.length
        shift(cache, n, -common)  # > 0: a row at pad 0 and the end would have finished

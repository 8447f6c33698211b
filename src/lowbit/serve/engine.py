"""The serving engine: a bounded queue of requests and one worker thread that runs them, in
batches, on the decode loop (:class:`lowbit.runtime.Runtime`).

Requests that wait together and ask for the same sampling settings are prefilled and decoded
as one batch (each row with its own token limit); tokens reach each request's consumer as they
are chosen; a request whose client went away is cancelled at the next step. The HTTP layer
(:mod:`lowbit.serve.app`) never touches the model.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError
from lowbit.runtime import Runtime, Sampling

log = logging.getLogger(__name__)


class QueueFull(LowbitError):
    """More requests wait than the server accepts (HTTP 429)."""


@dataclass(eq=False)  # jobs are compared by identity (batches, the held list)
class Job:
    """One request: its prompt ids, limit and sampling, and where its tokens go.

    ``emit(token)`` is called from the worker thread with each new token (also kept in
    ``tokens``), then ``emit(None)`` once with ``finish`` set. ``cancelled`` is set by the HTTP
    layer when the client leaves."""

    ids: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[int | None], None]
    created: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish: str = ""
    tokens: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    shadow: bool = False  # keep the logits of each step for the quality monitor
    logits: list = field(default_factory=list)  # (vocab,) per step, while ``shadow``


@dataclass
class BatchStats:
    rows: int
    prompt_tokens: int
    generated: int
    decode_tps: float


class Engine:
    """``submit(job)`` from any thread; a daemon worker runs the jobs. ``max_batch`` rows are
    decoded together; at most ``max_queue`` jobs wait (more: :class:`QueueFull`)."""

    def __init__(
        self, runtime: Runtime, stop_ids: list[int], max_batch: int = 8, max_queue: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_end: Callable[[Job], None] | None = None,
        shadow: Any = None,
    ) -> None:  # fmt: skip
        self.runtime, self.stop_ids = runtime, stop_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_batch, self.on_end = on_batch, on_end
        self.shadow = shadow  # lowbit.serve.shadow.Shadow, or None
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: list[Job] = []  # taken from the queue, waiting for a matching batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)
        self.busy = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return self._waiting.qsize() + len(self._held)

    def submit(self, job: Job) -> None:
        job.shadow = self.shadow is not None and self.shadow.wants()
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later") from None

    def _next_batch(self) -> list[Job]:
        """The oldest job and up to max_batch - 1 more waiting with the same sampling."""
        if not self._held:
            try:
                self._held.append(self._waiting.get(timeout=0.2))
            except queue.Empty:
                return []
        while True:  # drain what is waiting now, keeping arrival order
            try:
                self._held.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        live = [j for j in self._held if not j.cancelled.is_set()]
        for job in self._held:
            if job.cancelled.is_set():
                self._end(job, "cancelled")
        key = live[0].sampling if live else None
        batch = list(itertools.islice((j for j in live if j.sampling == key), self.max_batch))
        self._held = [j for j in live if j not in batch]
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            self.busy = len(batch)
            try:
                self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for job in batch:
                    job.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    self._end(job, "error")
            finally:
                self.busy = 0

    def _generate(self, batch: list[Job]) -> None:
        def on_tokens(new: list[int | None]) -> list[int]:
            now = time.perf_counter()
            for job, tok in zip(batch, new, strict=True):
                if tok is not None:
                    job.first_token_s = job.first_token_s or now - job.created
                    job.tokens.append(tok)
                    job.emit(tok)
            return [i for i, job in enumerate(batch) if job.cancelled.is_set()]

        keep = [(row, job) for row, job in enumerate(batch) if job.shadow]

        def on_logits(logits) -> None:  # (B, vocab); rows past their end are cut off below
            for row, job in keep:
                job.logits.append(logits[row].float().clone())

        log.debug("batch of %d (%d waiting)", len(batch), self.depth())
        run = self.runtime.generate([j.ids for j in batch], [j.max_tokens for j in batch],
                                    batch[0].sampling, self.stop_ids, on_tokens,
                                    on_logits if keep else None)  # fmt: skip
        for _, job in keep:
            del job.logits[len(job.tokens) :]
        for job, finish in zip(batch, run.finish, strict=True):
            self._end(job, finish)
        if self.on_batch is not None:
            generated = sum(len(t) for t in run.tokens)
            self.on_batch(BatchStats(len(batch), sum(len(j.ids) for j in batch), generated,
                                     run.decode_tps))  # fmt: skip

    def _end(self, job: Job, finish: str) -> None:
        job.finish = finish
        job.emit(None)
        if self.on_end is not None:
            self.on_end(job)
        if self.shadow is not None:
            self.shadow.offer(job)

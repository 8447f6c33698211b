"""The serving engine: a bounded queue of requests and one worker thread that runs them, in
batches, on the decode loop (:class:`lowbit.runtime.Runtime`).

Requests join a running batch between decode steps (continuous batching,
:mod:`lowbit.runtime.batch`): each is prefilled into a free row as soon as one is free, in
arrival order, with its own sampling settings and generator (a seeded request draws what it
would alone). Where the forward cannot take rows between steps (the model's own forward,
LiteRT), the requests that wait together with the same settings run as one whole batch.
Tokens reach each request's consumer as they are chosen; a request whose client went away is
cancelled at the next step. The canary check (if any) runs between steps. The HTTP layer
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

from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.runtime import Runtime, Sampling
from lowbit.runtime.batch import ContinuousBatch, Event

log = logging.getLogger(__name__)
# served logits one shadowed request keeps (float32): 170 steps of a 49,152-token vocabulary,
# 55 of a 151,936-token one; with the monitor's queue of 8, a bounded few hundred MB at most
SHADOW_BYTES = 32 << 20


class QueueFull(LowbitError):
    """More requests wait than the server accepts (HTTP 429)."""


@dataclass(eq=False)  # jobs are compared by identity (batches, the held list)
class Job:
    """One request: its prompt ids, limit and sampling, and where its tokens go.

    ``emit(token)`` is called from the worker thread with each new token (also kept in
    ``tokens``), then ``emit(None)`` once with ``finish`` set. :meth:`cancel` (the HTTP layer:
    the client left, or the answer reached a stop text) ends it at the next step."""

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
    shadow: bool = False  # keep the logits of the first steps for the quality monitor
    logits: list = field(default_factory=list)  # (vocab,) float32 per step, while ``shadow``
    cancel_as: str = "cancelled"  # the finish a cancelled job ends with

    def keep_logits(self, logits: Tensor) -> None:
        """A step's served logits (vocab,), kept for the quality monitor while the kept ones
        stay under SHADOW_BYTES: a long answer is scored on its first steps, so a shadowed
        request holds a bounded amount of memory whatever its length and vocabulary."""
        if self.shadow and (len(self.logits) + 1) * logits.numel() * 4 <= SHADOW_BYTES:
            self.logits.append(logits.float().clone())

    def cancel(self, finish: str = "cancelled") -> None:
        """End the job at the next step, with ``finish``: "cancelled" (the client left) or
        "stop" (the answer is complete)."""
        self.cancel_as = finish
        self.cancelled.set()


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
        canary: Any = None,
    ) -> None:  # fmt: skip
        self.runtime, self.stop_ids = runtime, stop_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_batch, self.on_end = on_batch, on_end
        self.shadow = shadow  # lowbit.serve.shadow.Shadow, or None
        self.canary = canary  # lowbit.serve.canary_watch.CanaryWatch, or None
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: list[Job] = []  # taken from the queue, not yet running
        self._batch: ContinuousBatch | None = None  # rows join and leave between steps
        self._running: list[Job] = []  # the jobs in _batch (or in a whole batch)
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
        if self.depth() >= self.max_queue:  # jobs taken off the queue still wait for a row
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later") from None

    def _take(self, wait: bool) -> None:
        """Move the waiting jobs into ``_held`` in arrival order (with ``wait``, waiting up to
        0.2 s for one when none is held); cancelled ones end here."""
        if wait and not self._held:
            try:
                self._held.append(self._waiting.get(timeout=0.2))
            except queue.Empty:
                return
        while True:
            try:
                self._held.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        for job in [j for j in self._held if j.cancelled.is_set()]:
            self._held.remove(job)
            self._end(job, "cancelled")

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.canary is not None:  # between steps: it never touches the batch's cache
                self.canary.between_batches()
            try:
                if self._batch is None:
                    self._start()
                else:
                    self._continue()
            except Exception as exc:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                failed = self._running or self._held[:1]  # nothing ran: the oldest job failed
                self._held = [j for j in self._held if j not in failed]
                for job in failed:
                    if not job.finish:
                        self._fail(job, exc)
                self._batch, self._running = None, []
            finally:
                self.busy = len(self._running)

    def _start(self) -> None:
        """Open a batch for the oldest job's sampling settings; a forward that cannot take
        rows between steps runs the jobs that wait now as one whole batch instead."""
        self._take(wait=True)
        if not self._held:
            return
        batch = self.runtime.continuous(self.max_batch, self.stop_ids)
        if batch is not None:
            self._batch = batch
            self._admit()
            return
        key = self._held[0].sampling
        jobs = list(itertools.islice((j for j in self._held if j.sampling == key), self.max_batch))
        self._held = [j for j in self._held if j not in jobs]
        self._running, self.busy = jobs, len(jobs)
        self._generate(jobs)
        self._running = []

    def _continue(self) -> None:
        """Admit what waits, drop cancelled rows, decode one step."""
        assert self._batch is not None
        self._take(wait=False)
        self._admit()
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._batch.leave(job)
            self._running.remove(job)
            self._end(job, "cancelled")
        if self._running:
            start = time.perf_counter()
            events = self._batch.step(self._keep_logits)
            seconds = time.perf_counter() - start
            for event in events:
                self._deliver(event)
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(events), 0, len(events), len(events) / seconds))
        if not self._running:
            self._batch = None

    def _admit(self) -> None:
        """Join held jobs, oldest first, while rows are free."""
        batch = self._batch
        assert batch is not None
        while self._held:
            job = self._held[0]
            if len(job.ids) + job.max_tokens > batch.context:
                self._held.pop(0)
                job.error = f"prompt + max_tokens exceed the context of {batch.context} tokens"
                self._end(job, "error")
                continue
            if not batch.fits(len(job.ids), job.max_tokens):
                return
            self._held.pop(0)
            log.debug("join: %d running, %d waiting", len(self._running) + 1, self.depth())
            try:  # a prompt that fails its prefill fails alone; the cache stays consistent
                event = batch.join(job, job.ids, job.max_tokens, job.sampling, self._keep_logits)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail(job, exc)
                continue
            self._running.append(job)
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        job = event.key
        assert isinstance(job, Job)
        if event.token is not None:
            job.first_token_s = job.first_token_s or time.perf_counter() - job.created
            job.tokens.append(event.token)
            job.emit(event.token)
        if event.finish is not None:
            self._running.remove(job)
            self._end(job, event.finish)

    @staticmethod
    def _keep_logits(jobs: list, logits) -> None:  # (n, vocab), for shadowed requests
        for row, job in enumerate(jobs):
            job.keep_logits(logits[row])

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
                job.keep_logits(logits[row])

        log.debug("batch of %d (%d waiting)", len(batch), self.depth())
        run = self.runtime.generate([j.ids for j in batch], [j.max_tokens for j in batch],
                                    batch[0].sampling, self.stop_ids, on_tokens,
                                    on_logits if keep else None)  # fmt: skip
        for job, finish in zip(batch, run.finish, strict=True):
            self._end(job, finish)
        if self.on_batch is not None:
            generated = sum(len(t) for t in run.tokens)
            self.on_batch(BatchStats(len(batch), sum(len(j.ids) for j in batch), generated,
                                     run.decode_tps))  # fmt: skip

    def _fail(self, job: Job, exc: Exception) -> None:
        job.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._end(job, "error")

    def _end(self, job: Job, finish: str) -> None:
        stopped = job.cancelled.is_set() and job.cancel_as == "stop"  # at its last step too
        late = stopped and finish == "length"
        job.finish = job.cancel_as if finish == "cancelled" or late else finish
        del job.logits[len(job.tokens) :]  # a stop token's step is not served
        job.emit(None)
        if self.on_end is not None:
            self.on_end(job)
        if self.shadow is not None:
            self.shadow.offer(job)

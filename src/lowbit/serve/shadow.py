"""Quality monitoring while serving: a sampled fraction of requests re-scored against a
reference model, off the hot path (an image model's monitor: :mod:`lowbit.serve.image_shadow`).

For a shadowed request the engine keeps the logits it served at each step, up to
:data:`lowbit.serve.engine.SHADOW_BYTES` of them (a long answer is scored on its first steps).
After the request ends, a background thread runs the reference model (``--ref``: the float
model or any higher-precision variant) once over the prompt and those steps' tokens and
compares, at the generated positions, KL(ref ‖ served) and top-1 agreement
(:func:`lowbit.eval.perplexity.kl_top1`, the same measure as ``lowbit eval --ref``).
Per-request figures go to histograms, the mean over the last ``window`` requests to gauges;
past ``alert_kl`` the server reports ``degraded`` on /health and logs a warning. The queue is
bounded: when scoring falls behind, requests are not shadowed rather than delayed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval.perplexity import kl_top1

log = logging.getLogger(__name__)


class Sampler:
    """What both monitors share: a sampled fraction of requests (``wants``), handed over when
    they end (``submit``) into a bounded queue that one background thread drains through
    ``_score`` (a failure is logged, never raised), the last ``window`` results kept."""

    def __init__(self, rate: float, window: int, seed: int = 0) -> None:
        self.rate = rate
        self.recent: deque = deque(maxlen=window)
        self._random = random.Random(seed)
        self._jobs: queue.Queue = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        # torch's count now: a thread takes the process's count at its first parallel op, which
        # the engine may be holding at one then (lowbit.kernels.threads)
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="lowbit-shadow", daemon=True)
        self.degraded = False
        self.scored = 0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wants(self) -> bool:
        """Whether the next request is shadowed."""
        return self.rate > 0 and not self._jobs.full() and self._random.random() < self.rate

    def submit(self, job) -> None:
        # falling behind: skip this one rather than hold memory or the hot path
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(job)

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._score(job)
            except Exception:  # a scoring failure must never take the server down
                log.exception("shadow scoring failed")
            finally:
                self._done(job)

    def _score(self, job) -> None:
        raise NotImplementedError

    def _done(self, job) -> None:
        """Called after each job is scored (or failed): drop what it held."""

    def _alert(self, bad: bool, message: str, *args) -> None:
        """Set ``degraded``; log ``message % args`` as a warning when it turns on."""
        was, self.degraded = self.degraded, bad
        if bad and not was:
            log.warning(message, *args)


class Shadow(Sampler):
    """The language-model monitor: KL(ref || served) and top-1 per shadowed request."""

    def __init__(self, ref: nn.Module, rate: float, alert_kl: float | None, metrics,
                 window: int = 50, seed: int = 0) -> None:  # fmt: skip
        super().__init__(rate, window, seed)
        self.ref, self.alert_kl, self.metrics = ref, alert_kl, metrics

    def offer(self, job) -> None:
        """A finished request; scored later if it was shadowed and produced tokens."""
        if not job.shadow or not job.logits or job.finish not in ("stop", "length"):
            return
        self.submit(job)

    def _done(self, job) -> None:
        job.logits = []

    @torch.inference_mode()
    def _score(self, job) -> None:
        p, n = len(job.ids), len(job.logits)  # the first n generated tokens were kept
        ids = torch.tensor([job.ids + job.tokens[:n]])  # (1, P + N)
        out = self.ref(ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        ref_logp = F.log_softmax(logits[0, p - 1 : p - 1 + n].float(), dim=-1)  # (N, V)
        served = F.log_softmax(torch.stack(job.logits), dim=-1)  # (N, V)
        kl, top1 = kl_top1(ref_logp, served)
        self.record(kl / n, top1 / n)

    def rolling(self) -> tuple[float | None, float | None]:
        """Mean KL and top-1 over the last ``window`` scored requests (None before any)."""
        recent = list(self.recent)
        if not recent:
            return None, None
        return (sum(k for k, _ in recent) / len(recent), sum(t for _, t in recent) / len(recent))

    def status(self) -> dict:
        """For /health."""
        kl, top1 = self.rolling()
        return {"scored": self.scored, "alert_kl": self.alert_kl, "kl_rolling": kl,
                "top1_rolling": top1}  # fmt: skip

    def record(self, kl: float, top1: float) -> None:
        """One request's mean KL and top-1 rate: histograms, rolling gauges, the alert."""
        self.scored += 1
        self.recent.append((kl, top1))
        mean_kl, mean_top1 = self.rolling()
        self.metrics.shadow_kl.observe(kl)
        self.metrics.shadow_top1.observe(top1)
        self.metrics.shadow_kl_rolling.set(mean_kl)
        self.metrics.shadow_top1_rolling.set(mean_top1)
        self._alert(self.alert_kl is not None and not mean_kl <= self.alert_kl,  # NaN too
                    "quality alert: mean KL(ref || served) %.4f over the last %d shadowed "
                    "requests exceeds --alert-kl %g", mean_kl, len(self.recent),
                    self.alert_kl)  # fmt: skip

"""The served model checked against its canary prompts, without a reference model.

A lowbit folder records, at quantize time, the float model's answers on a few fixed windows and
the tolerance the quantized model met (:mod:`lowbit.eval.canary`). The engine calls
:meth:`CanaryWatch.between_batches` before every decode step; at start and then every
``every_s`` seconds the watch scores the served model on those windows (on the engine's thread,
so it never competes with a step for the cores: running streams pause for one check), sets the
gauges and turns ``/health`` to ``degraded`` while the KL is above the tolerance.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.eval.canary import CanaryCheck, check

log = logging.getLogger(__name__)


class CanaryWatch:
    def __init__(self, model: nn.Module, folder: Path, manifest: dict[str, Any], metrics: Any,
                 every_s: float, tolerance: float | None = None) -> None:  # fmt: skip
        self.model, self.folder, self.manifest = model, folder, manifest
        self.metrics, self.every_s, self.tolerance = metrics, every_s, tolerance
        self.last: CanaryCheck | None = None
        self.checked_at: float | None = None  # time.time() of the last check
        self._due = 0.0  # time.monotonic() of the next check; 0: at once

    @property
    def degraded(self) -> bool:
        return self.last is not None and not self.last.ok

    def between_batches(self) -> None:
        """Run a check if one is due (called from the engine's thread)."""
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.every_s if self.every_s > 0 else float("inf")
        try:
            self.run()
        except Exception:  # a failed check must never take the server down
            log.exception("canary check failed")
            self.metrics.canary_checks.labels("error").inc()

    def run(self) -> Any:
        was = self.degraded
        result = check(self.model, self.folder, self.manifest, self.tolerance)
        self.last, self.checked_at = result, time.time()
        if isinstance(result, CanaryCheck):
            self.metrics.canary_kl.set(result.kl)
            self.metrics.canary_top1.set(result.top1)
        else:  # an image model's (lowbit.eval.canary_image)
            self.metrics.canary_psnr.set(result.psnr)
        self.metrics.canary_tolerance.set(result.tolerance)
        self.metrics.canary_checks.labels("ok" if result.ok else "degraded").inc()
        if self.degraded and not was:
            log.warning("quality alert: %s", result.line())
        else:
            log.info("%s", result.line())
        return result

    def status(self) -> dict[str, Any] | None:
        """For /health: the last check (None before the first)."""
        if self.last is None:
            return None
        return {**self.last.to_dict(), "checked_at": self.checked_at, "every_s": self.every_s}

"""An image model's quality monitor while serving (``lowbit serve IMAGE_MODEL --ref MODEL``):
a sampled fraction of requests re-run on the reference model off the hot path, on the same
latents or the same image, and the served images' PSNR against the reference's (per image,
averaged per request, as ``lowbit eval --ref`` measures) recorded: a histogram per request, the
mean over the last ``window`` requests as a gauge and on /health, which says ``degraded`` (with
a logged warning) while that mean is below ``alert_psnr``. Identical images count as 100 dB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.eval.image import IDENTICAL_DB, psnr
from lowbit.serve.shadow import Sampler


@dataclass
class ImageShadowJob:
    reference: Callable[[nn.Module], Tensor]  # the reference's images for the same input
    served: Tensor  # (N, C, H, W) in [0, 1], as answered


class ImageShadow(Sampler):
    def __init__(self, ref: nn.Module, rate: float, alert_psnr: float | None, metrics,
                 window: int = 50, seed: int = 0) -> None:  # fmt: skip
        super().__init__(rate, window, seed)
        self.ref, self.alert_psnr, self.metrics = ref, alert_psnr, metrics

    @torch.inference_mode()
    def _score(self, job: ImageShadowJob) -> None:
        db = psnr(job.served, job.reference(self.ref), per_image=True)
        self.record(min(db, IDENTICAL_DB))  # identical images: infinite

    def rolling(self) -> float | None:
        """Mean PSNR over the last ``window`` scored requests (None before any)."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def record(self, db: float) -> None:
        """One request's PSNR: histogram, rolling gauge, the alert."""
        self.scored += 1
        self.recent.append(db)
        mean = self.rolling()
        self.metrics.shadow_psnr.observe(db)
        self.metrics.shadow_psnr_rolling.set(mean)
        self._alert(self.alert_psnr is not None and not mean >= self.alert_psnr,  # NaN too
                    "quality alert: mean PSNR against the reference %.2f dB over the last %d "
                    "shadowed requests is below --alert-psnr %g", mean, len(self.recent),
                    self.alert_psnr)  # fmt: skip

    def status(self) -> dict:
        return {"scored": self.scored, "alert_psnr": self.alert_psnr,
                "psnr_rolling": self.rolling()}  # fmt: skip

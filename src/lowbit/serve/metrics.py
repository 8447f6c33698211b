"""The server's Prometheus metrics, in a registry of their own (no process-global state)."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counts by endpoint and status, latency and time-to-first-token histograms,
    prompt / generated tokens, images made and the last image request's images/s, decode
    tokens/s of the last batch, queue depth, running rows,
    and the process's RSS / CPU (``process_*``, prometheus-client's process collector)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter("lowbit_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("lowbit_request_latency_seconds", "request to its last token "
                                 "(or its images)",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.finished = Counter("lowbit_finished_requests", "generations by how they ended: "
                                "stop, length, cancelled, error", ["reason"],
                                registry=r)  # fmt: skip
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "prompt tokens prefilled",
                                     registry=r)  # fmt: skip
        self.generated_tokens = Counter("lowbit_generated_tokens", "tokens generated",
                                        registry=r)  # fmt: skip
        self.decode_tps = Gauge("lowbit_decode_tokens_per_second", "decode tokens/s of the "
                                "last batch (all rows)", registry=r)  # fmt: skip
        self.images = Counter("lowbit_images", "images generated or upscaled", registry=r)
        self.images_per_s = Gauge("lowbit_images_per_second", "images/s of the last image "
                                  "request (the model's time only)", registry=r)  # fmt: skip
        self.queue_depth = Gauge("lowbit_queue_depth", "requests waiting", registry=r)
        self.running = Gauge("lowbit_running_requests", "requests being decoded", registry=r)
        kl_buckets = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10)
        self.shadow_kl = Histogram("lowbit_shadow_kl", "per shadowed request: mean KL(ref || "
                                   "served) over its tokens", buckets=kl_buckets,
                                   registry=r)  # fmt: skip
        self.shadow_top1 = Histogram("lowbit_shadow_top1", "per shadowed request: top-1 "
                                     "agreement with the reference", buckets=(0.5, 0.7, 0.8, 0.9,
                                     0.95, 0.99, 1.0), registry=r)  # fmt: skip
        self.shadow_kl_rolling = Gauge("lowbit_shadow_kl_rolling", "mean KL over the last "
                                       "shadowed requests", registry=r)  # fmt: skip
        self.shadow_top1_rolling = Gauge("lowbit_shadow_top1_rolling", "mean top-1 over the "
                                         "last shadowed requests", registry=r)  # fmt: skip
        self.shadow_psnr = Histogram("lowbit_shadow_psnr", "image models, per shadowed "
                                     "request: PSNR (dB) of the served images against the "
                                     "reference's", buckets=(20, 25, 30, 35, 40, 45, 50, 60, 80,
                                     100), registry=r)  # fmt: skip
        self.shadow_psnr_rolling = Gauge("lowbit_shadow_psnr_rolling", "mean PSNR over the last "
                                         "shadowed requests", registry=r)  # fmt: skip
        self.canary_kl = Gauge("lowbit_canary_kl", "last canary check: mean KL(float || "
                               "served) per token over top-k + rest", registry=r)  # fmt: skip
        self.canary_top1 = Gauge("lowbit_canary_top1", "last canary check: top-1 agreement "
                                 "with the float model", registry=r)  # fmt: skip
        self.canary_psnr = Gauge("lowbit_canary_psnr", "image models, last canary check: PSNR "
                                 "(dB) against the float model's outputs", registry=r)  # fmt: skip
        self.canary_tolerance = Gauge("lowbit_canary_tolerance", "canary KL above which the "
                                      "model is degraded (an image model: the PSNR below "
                                      "which)", registry=r)  # fmt: skip
        self.canary_checks = Counter("lowbit_canary_checks", "canary checks by result: ok, "
                                     "degraded, error", ["result"], registry=r)  # fmt: skip

    def job_done(self, job) -> None:
        """Record one finished generation (:class:`lowbit.serve.engine.Job`)."""
        self.finished.labels(job.finish).inc()
        if job.finish in ("stop", "length") or job.first_token_s is not None:  # it was prefilled
            self.prompt_tokens.inc(len(job.ids))
        self.latency.observe(time.perf_counter() - job.created)
        if job.first_token_s is not None:
            self.ttft.observe(job.first_token_s)
        self.generated_tokens.inc(len(job.tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)

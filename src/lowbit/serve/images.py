"""``lowbit serve`` for an image model: a generator answers OpenAI's
``POST /v1/images/generations`` and a super-resolution model ``POST /v1/images/upscale``
(lowbit's own: OpenAI has no upscale), both with base64 PNGs, beside the shared routes
(:mod:`lowbit.serve.base`).

One worker thread runs the model, one request at a time (a forward already uses every core);
at most ``max_queue`` requests wait (more: HTTP 429), and one whose client left before it
started is dropped. The model runs as ``lowbit generate`` runs it
(:mod:`lowbit.models.images.run`): a generator's samples from a seed (random unless given),
an upscale a window at a time (bounded memory) of an image of at most ``max_pixels`` pixels,
grey in, grey out, a 16-bit grey file answered with a 16-bit PNG. With a monitor (``--ref``),
a sampled fraction of requests is re-run on the reference model in the background
(:mod:`lowbit.serve.image_shadow`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.eval.image import outputs
from lowbit.models.images.data import image_from_bytes
from lowbit.models.images.run import png_bytes, upscale_image
from lowbit.models.images.tiles import DEFAULT_TILE, upscaler
from lowbit.serve.base import ServeSettings, base_app, guarded
from lowbit.serve.engine import QueueFull
from lowbit.serve.image_shadow import ImageShadow, ImageShadowJob
from lowbit.serve.limits import error_body
from lowbit.serve.metrics import Metrics
from lowbit.serve.schemas import ImageGenerationRequest, UpscaleRequest

log = logging.getLogger(__name__)


class ImageWorker:
    """``submit(fn)`` from the event loop; one thread runs the functions in order."""

    def __init__(self, max_queue: int, shadow: ImageShadow | None = None,
                 canary: Any = None) -> None:  # fmt: skip
        self.max_queue = max_queue
        self.shadow = shadow  # the quality monitor, closed by whoever closes the worker
        # lowbit.serve.canary_watch.CanaryWatch: checked on this thread (never beside a
        # forward) before a job when one is due; see watch_canary
        self.canary = canary
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowbit-images")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.waiting = self.busy = 0

    def watch_canary(self) -> None:
        """Check the canary now and, every ``every_s`` seconds, also while no request comes: a
        timer queues an empty job, before which the due check runs."""
        if self.canary is None:
            return
        self.submit(lambda: None)
        if self.canary.every_s <= 0:
            return

        def tick() -> None:
            while not self._stop.wait(self.canary.every_s):
                with contextlib.suppress(QueueFull):  # busy: a request's job checks it
                    self.submit(lambda: None)

        threading.Thread(target=tick, name="lowbit-canary-timer", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self.waiting += 1

        def run() -> Any:
            with self._lock:
                self.waiting, self.busy = self.waiting - 1, 1
            try:
                if self.canary is not None:
                    self.canary.between_batches()
                with torch.inference_mode():
                    return fn()
            finally:
                with self._lock:
                    self.busy = 0

        future = self._pool.submit(run)
        future.add_done_callback(self._dropped)
        return future

    def _dropped(self, future: Future) -> None:
        if future.cancelled():  # cancelled while it waited: ``run`` never started
            with self._lock:
                self.waiting -= 1

    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return self.waiting

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def create_image_app(entry: Any, model: nn.Module, worker: ImageWorker,
                     settings: ServeSettings, metrics: Metrics) -> Any:  # fmt: skip
    """The ASGI app for the image model ``entry`` (a :class:`lowbit.models.images.ImageModel`)
    loaded as ``model``; the worker's ``shadow`` (started) re-scores some requests against a
    reference."""
    shadow = worker.shadow

    def watch(reference: Callable[[nn.Module], Tensor], served: Tensor) -> None:
        if shadow is not None and shadow.wants():
            shadow.submit(ImageShadowJob(reference, served))

    app = base_app(settings, metrics, worker)
    side = _sample_size(entry, model)

    async def answer(request: Request, work: Callable[[], Answer]) -> Response:
        """Queue ``work`` (run on the worker: decoding, the model, encoding) and answer with
        its images; its LowbitError is the client's 400, anything else a logged 500."""
        created = time.perf_counter()
        try:
            future = worker.submit(work)
        except QueueFull as exc:
            return JSONResponse(error_body(str(exc), "rate_limit_error", "queue_full"), 429,
                                headers={"Retry-After": "1"})  # fmt: skip
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                try:
                    done = await asyncio.wait_for(asyncio.shield(waiting), timeout=0.5)
                    break
                except asyncio.TimeoutError:  # not the builtin's alias before Python 3.11
                    if await request.is_disconnected() and future.cancel():
                        return Response(status_code=499)
        except LowbitError as exc:
            return JSONResponse(error_body(str(exc), "invalid_request_error"), 400)
        except Exception:
            log.exception("an image request failed")
            return JSONResponse(error_body("the model failed on this request (the server logged "
                                           "why)", "server_error"), 500)  # fmt: skip
        metrics.images.inc(len(done.images))
        metrics.images_per_s.set(len(done.images) / max(done.seconds, 1e-9))
        metrics.latency.observe(time.perf_counter() - created)
        data = [{"b64_json": image} for image in done.images]
        return JSONResponse({"created": int(time.time()), "data": data, **done.extra})

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationRequest, request: Request) -> Response:
        if entry.sample is None:
            raise LowbitError(f"{entry.name} upscales images: POST /v1/images/upscale")
        if body.prompt.strip():
            raise LowbitError(f"{entry.name} takes no prompt (it draws samples from a seed): "
                              f"send an empty prompt")  # fmt: skip
        if body.n > settings.max_images:
            raise LowbitError(f"n is at most {settings.max_images} here")
        if body.size is not None and body.size != side:
            raise LowbitError(f"size: {entry.name} draws {side} images")
        n, seed = body.n, secrets.randbelow(2**31) if body.seed is None else body.seed

        def work() -> Answer:
            start = time.perf_counter()
            inputs = entry.sample(n, seed)
            images = outputs(model, inputs, entry.output_range)
            seconds = time.perf_counter() - start
            watch(lambda ref: outputs(ref, inputs, entry.output_range), images)
            return Answer([_b64(png_bytes(image)) for image in images], seconds,
                          {"seed": seed, "size": side})  # fmt: skip

        return await answer(request, work)

    @app.post("/v1/images/upscale")
    async def upscale(body: UpscaleRequest, request: Request) -> Response:
        if entry.sample is not None:
            raise LowbitError(f"{entry.name} is a generator: POST /v1/images/generations")
        encoded = body.image  # decoded on the worker: a queued request holds only this

        def work() -> Answer:
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise LowbitError("image: not base64 (send the file's bytes, "
                                  "base64-encoded)") from None  # fmt: skip
            image = image_from_bytes(data, entry.channels, settings.max_pixels)
            del data
            start = time.perf_counter()
            out = _upscale(model, entry, image.pixels)
            seconds = time.perf_counter() - start
            watch(lambda ref: _upscale(ref, entry, image.pixels)[None], out[None])
            h, w = out.shape[-2:]
            return Answer([_b64(png_bytes(out, image.bits))], seconds, {"size": f"{w}x{h}"})

        return await answer(request, work)

    return guarded(app, settings, metrics)


class Answer(NamedTuple):
    images: list[str]  # base64 PNGs
    seconds: float  # the model's time
    extra: dict  # more fields of the response


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sample_size(entry: Any, model: nn.Module) -> str | None:
    """A generator's image size, "WxH", from one sample (which also warms the model up)."""
    if entry.sample is None:
        return None
    with torch.inference_mode():
        h, w = model(entry.sample(1, 0)).shape[-2:]
    return f"{w}x{h}"


def _upscale(model: nn.Module, entry: Any, x: Tensor) -> Tensor:
    return upscale_image(upscaler(model, entry.halo, DEFAULT_TILE), x, entry.output_range)

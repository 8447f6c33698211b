"""What every ``lowbit serve`` app shares, text or image: OpenAI-style errors for invalid
bodies, unknown routes and refused requests, ``/health``, ``/metrics`` and ``/v1/models``,
and :func:`guarded`: the app behind the request counter and the body-size / API-key guard
(:mod:`lowbit.serve.limits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from lowbit.errors import LowbitError
from lowbit.serve.limits import Counted, Guard, error_body
from lowbit.serve.metrics import Metrics


@dataclass
class ServeSettings:
    model_name: str
    max_tokens: int = 1024  # per request; more is a 400
    max_body: int = 1 << 20  # bytes
    api_key: str | None = None
    max_images: int = 16  # images per generation request
    max_pixels: int = 2048 * 2048  # of an image to upscale


def base_app(settings: ServeSettings, metrics: Metrics, engine: Any) -> FastAPI:
    """The FastAPI app with the shared routes over ``engine`` (the text server's
    :class:`~lowbit.serve.engine.Engine` or an image model's ``ImageWorker``: ``depth()``,
    ``busy``, and its ``shadow`` and ``canary`` monitors, each None or with ``degraded`` and
    ``status()``)."""
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, "invalid_request_error", param=where), 400)

    @app.exception_handler(LowbitError)
    async def refused(_: Request, exc: LowbitError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), 400)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:  # logged by the server
        return JSONResponse(error_body("the server failed on this request", "server_error"), 500)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # unknown routes (404), wrong methods (405), bodies FastAPI cannot parse (400)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        monitors = {"shadow": engine.shadow, "canary": engine.canary}
        bad = any(m is not None and m.degraded for m in monitors.values())
        out = {"status": "degraded" if bad else "ok", "queue": engine.depth(),
               "running": engine.busy}  # fmt: skip
        return out | {k: m.status() for k, m in monitors.items() if m is not None}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(engine.depth())
        metrics.running.set(engine.busy)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": 0, "owned_by": "lowbit"}]}  # fmt: skip

    return app


def guarded(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> Counted:
    """``app`` (all its routes added) behind the guard, every request counted by route."""
    routes = {getattr(r, "path", "") for r in app.routes}
    guard = Guard(app, settings.max_body, settings.api_key)
    return Counted(
        guard,
        routes,
        lambda route, status: metrics.requests.labels(route, str(status)).inc(),
    )

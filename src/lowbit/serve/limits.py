"""ASGI layers in front of the routes: request counts, the request body size and the bearer
API key. Plain ASGI rather than FastAPI middleware: Starlette's ``BaseHTTPMiddleware`` hides a
client's hang-up from ``request.is_disconnected()``, and the server drops the work of clients
that left."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.responses import JSONResponse


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Counted:
    """Counts every answered request by route and status (``count(route, status)``), those
    refused by the guard included; a path that names no route counts as ``other``, so clients
    cannot add series."""

    def __init__(self, app, routes: set[str], count: Callable[[str, int], None]):
        self.app, self.routes, self.count = app, routes, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499  # no answer started and nothing raised: the client left (nginx's 499)

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = False
        try:
            await self.app(scope, receive, counting_send)
            started = True
        finally:
            if not started and status == 499:
                status = 500  # an exception before any answer: the server's error
            path = scope["path"]
            self.count(path if path in self.routes else "other", status)


class Guard:
    """Refuses bodies over ``max_body`` bytes (413: the body is read, up to that size, before
    the routes see it, so a missing or false Content-Length or a chunked upload does not help)
    and, with ``api_key``, requests to /v1/ without ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app, max_body: int, api_key: str | None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")  # the bytes as sent (UTF-8 by clients)
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                body = error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                  "invalid_request_error", "invalid_api_key")  # fmt: skip
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():  # the body once, then the client's own messages (its hang-up)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        body = error_body(f"request body over {self.max_body} bytes", "invalid_request_error",
                          "body_too_large")  # fmt: skip
        await JSONResponse(body, status_code=413)(scope, receive, send)

"""ASGI guards in front of the routes: request body size and the bearer API key."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _TooLarge(Exception):
    pass


class Guard:
    """Refuses bodies over ``max_body`` bytes (413, counted as they arrive, so a missing or
    false Content-Length does not help) and, with ``api_key``, requests to /v1/ without
    ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app, max_body: int, api_key: str | None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                body = error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                  "invalid_request_error", "invalid_api_key")  # fmt: skip
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send) -> None:
        body = error_body(f"request body over {self.max_body} bytes", "invalid_request_error",
                          "body_too_large")  # fmt: skip
        await JSONResponse(body, status_code=413)(scope, receive, send)

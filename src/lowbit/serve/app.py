"""``lowbit serve``'s HTTP API: OpenAI-compatible completions and chat completions (JSON or
server-sent events), models, health and Prometheus metrics, over the engine's decode loop.

Everything about the model goes through :class:`lowbit.serve.engine.Engine`; this module only
validates, queues, streams and counts. Bad input gets an OpenAI-style error object with a 4xx
status: 400 (invalid JSON or fields, too many tokens), 401 (API key), 413 (body size), 429 (the
queue is full).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lowbit.runtime import Sampling
from lowbit.runtime.text import TextStream, chat_ids, text_ids
from lowbit.serve.base import ServeSettings, base_app
from lowbit.serve.engine import Engine, Job, QueueFull
from lowbit.serve.limits import Guard, error_body
from lowbit.serve.metrics import Metrics
from lowbit.serve.schemas import ChatRequest, CompletionRequest


def create_app(engine: Engine, tokenizer: Any, settings: ServeSettings,
               metrics: Metrics | None = None) -> Any:  # fmt: skip
    """The ASGI app (FastAPI behind the body-size / API-key guard)."""
    metrics = metrics or Metrics()
    api = _Api(engine, tokenizer, settings, metrics)

    app = base_app(settings, metrics, engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ids = text_ids(tokenizer, body.prompt)
        return await api.respond(request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]  # fmt: skip
        ids = chat_ids(tokenizer, messages)
        limit = body.max_completion_tokens or body.max_tokens or settings.max_tokens
        return await api.respond(request, body, ids, limit, chat=True)

    return Guard(app, settings.max_body, settings.api_key)


class _Api:
    def __init__(self, engine: Engine, tokenizer: Any, settings: ServeSettings,
                 metrics: Metrics) -> None:  # fmt: skip
        self.engine, self.tokenizer, self.settings, self.metrics = (engine, tokenizer, settings,
                                                                    metrics)  # fmt: skip

    def _refuse(self, status: int, message: str, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, "invalid_request_error", code), status)

    async def respond(self, request: Request, body: Any, ids: list[int], max_tokens: int,
                      chat: bool) -> Response:  # fmt: skip
        if max_tokens > self.settings.max_tokens:
            return self._refuse(400, f"max_tokens is at most {self.settings.max_tokens} here",
                                "max_tokens")  # fmt: skip
        if not ids:
            return self._refuse(400, "the prompt has no tokens", "empty_prompt")
        context = self.engine.runtime.limit
        if context and len(ids) + max_tokens > context:
            message = (f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                       f"context of {context} tokens")  # fmt: skip
            return self._refuse(400, message, "context_length")
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def emit(tok: int | None) -> None:  # worker thread; a whole answer needs only the end
            if body.stream or tok is None:
                loop.call_soon_threadsafe(tokens.put_nowait, tok)

        job = Job(ids, max_tokens, sampling, emit)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            return JSONResponse(error_body(str(exc), "rate_limit_error", "queue_full"), 429,
                                headers={"Retry-After": "1"})  # fmt: skip
        shape = _Shape(self.settings.model_name, chat, len(ids))
        if body.stream:
            return StreamingResponse(self._events(job, tokens, shape),
                                     media_type="text/event-stream")  # fmt: skip
        while True:
            try:
                await asyncio.wait_for(tokens.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:  # not the builtin's alias before Python 3.11
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
        if job.finish == "error":
            return JSONResponse(error_body(job.error or "generation failed", "server_error"), 500)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        return JSONResponse(shape.whole(text, job))

    async def _events(self, job: Job, tokens: asyncio.Queue,
                      shape: _Shape) -> AsyncIterator[str]:  # fmt: skip
        text = TextStream(self.tokenizer)
        try:
            yield shape.sse(shape.chunk("", first=True))
            while True:
                tok = await tokens.get()
                if tok is None:
                    break
                piece = text.push(tok)
                if piece:
                    yield shape.sse(shape.chunk(piece))
            yield shape.sse(shape.chunk("", finish=_reason(job)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that left stops its row at the next step


def _reason(job: Job) -> str:
    return "stop" if job.finish == "stop" else "length"


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, job: Job) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(job.tokens),
                 "total_tokens": self.prompt_tokens + len(job.tokens)}  # fmt: skip
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": _reason(job)}  # fmt: skip
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(job)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, piece: str, first: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {} if finish else {"content": piece})  # fmt: skip
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

"""``lowbit serve``'s HTTP API: OpenAI-compatible completions and chat completions (JSON or
server-sent events), models, health and Prometheus metrics, over the engine's decode loop.

Everything about the model goes through :class:`lowbit.serve.engine.Engine`; this module only
validates, queues, streams and counts. Bad input gets an OpenAI-style error object with a 4xx
status: 400 (invalid JSON or fields, too many tokens), 401 (API key), 413 (body size), 429 (the
queue is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lowbit.runtime import Sampling
from lowbit.runtime.text import StopText, chat_ids, text_ids
from lowbit.serve.base import ServeSettings, base_app, guarded
from lowbit.serve.engine import Engine, Job, QueueFull
from lowbit.serve.limits import error_body
from lowbit.serve.metrics import Metrics
from lowbit.serve.schemas import ChatRequest, CompletionRequest


def create_app(engine: Engine, tokenizer: Any, settings: ServeSettings,
               metrics: Metrics | None = None) -> Any:  # fmt: skip
    """The ASGI app (FastAPI behind the request counter and the body-size / API-key guard)."""
    metrics = metrics or Metrics()
    api = _Api(engine, tokenizer, settings, metrics)
    # Tokenizing a 1 MiB prompt takes a while: off the event loop, one request at a time (a
    # fast tokenizer may refuse concurrent calls from several threads)
    encoder = ThreadPoolExecutor(1, thread_name_prefix="lowbit-tokenize")

    app = base_app(settings, metrics, engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ids = await asyncio.get_running_loop().run_in_executor(encoder, text_ids, tokenizer,
                                                                body.prompt)  # fmt: skip
        return await api.respond(request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]  # fmt: skip
        ids = await asyncio.get_running_loop().run_in_executor(encoder, chat_ids, tokenizer,
                                                                messages)  # fmt: skip
        limit = body.max_completion_tokens or body.max_tokens or api.room(len(ids))
        return await api.respond(request, body, ids, limit, chat=True)

    return guarded(app, settings, metrics)


class _Api:
    def __init__(self, engine: Engine, tokenizer: Any, settings: ServeSettings,
                 metrics: Metrics) -> None:  # fmt: skip
        self.engine, self.tokenizer, self.settings, self.metrics = (engine, tokenizer, settings,
                                                                    metrics)  # fmt: skip

    def context(self) -> int:
        """The most tokens a request may hold, prompt and answer (the decode loop's)."""
        return self.engine.runtime.context

    def room(self, prompt: int) -> int:
        """A chat's max_tokens when it names none (OpenAI's: what the context leaves, here
        at most --max-tokens)."""
        return max(1, min(self.settings.max_tokens, self.context() - prompt))

    def _refuse(self, status: int, message: str, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, "invalid_request_error", code), status)

    async def respond(self, request: Request, body: Any, ids: list[int], max_tokens: int,
                      chat: bool) -> Response:  # fmt: skip
        if max_tokens > self.settings.max_tokens:
            return self._refuse(400, f"max_tokens is at most {self.settings.max_tokens} here",
                                "max_tokens")  # fmt: skip
        if not ids:
            return self._refuse(400, "the prompt has no tokens", "empty_prompt")
        if len(ids) + max_tokens > self.context():
            message = (f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                       f"context of {self.context()} tokens")  # fmt: skip
            return self._refuse(400, message, "context_length")
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        loop = asyncio.get_running_loop()
        pieces_out: asyncio.Queue[str | None] = asyncio.Queue()
        stop = StopText(self.tokenizer, body.stops())

        def emit(tok: int | None) -> None:  # on the engine's thread, so that a stop text ends
            piece = stop.flush() if tok is None else stop.push(tok)  # the job at this step
            if stop.stopped and tok is not None:  # (whatever the HTTP side has read by then)
                job.cancel("stop")
            elif stop.stopped and job.finish == "length":  # (found in the last, held text)
                job.finish = "stop"
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is ending
                if piece:
                    loop.call_soon_threadsafe(pieces_out.put_nowait, piece)
                if tok is None:
                    loop.call_soon_threadsafe(pieces_out.put_nowait, None)

        job = Job(ids, max_tokens, sampling, emit)
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            return JSONResponse(error_body(str(exc), "rate_limit_error", "queue_full"), 429,
                                headers={"Retry-After": "1"})  # fmt: skip
        usage = body.stream_options is not None and body.stream_options.include_usage
        shape = _Shape(self.settings.model_name, chat, len(ids), usage)
        pieces = self._pieces(pieces_out)
        if body.stream:
            return StreamingResponse(self._events(job, pieces, shape),
                                     media_type="text/event-stream")  # fmt: skip
        text = []
        async for piece in _watching(pieces, request, job):
            text.append(piece)
        if job.finish == "cancelled":
            return Response(status_code=499)  # the client left
        if job.finish == "error":
            return JSONResponse(error_body(job.error or "generation failed", "server_error"), 500)
        return JSONResponse(shape.whole("".join(text), job))

    async def _pieces(self, queue: asyncio.Queue) -> AsyncIterator[str]:
        """The answer's text as it becomes final, up to a stop text (cut on the engine's
        thread: :meth:`respond`'s ``emit``)."""
        while (piece := await queue.get()) is not None:
            yield piece

    async def _events(self, job: Job, pieces: AsyncIterator[str],
                      shape: _Shape) -> AsyncIterator[str]:  # fmt: skip
        try:
            yield shape.sse(shape.chunk("", first=True))
            async for piece in pieces:
                yield shape.sse(shape.chunk(piece))
            if job.finish == "error":  # the client raises on an error event (no [DONE])
                yield shape.sse(error_body(job.error or "generation failed", "server_error"))
                return
            yield shape.sse(shape.chunk("", finish=_reason(job)))
            if shape.usage_chunks:  # OpenAI's stream_options.include_usage
                yield shape.sse({**shape.chunk(""), "choices": [], "usage": shape.usage(job)})
            yield "data: [DONE]\n\n"
        finally:
            if not job.cancelled.is_set():
                job.cancel()  # a client that left stops its row at the next step


async def _watching(pieces: AsyncIterator[str], request: Request,
                    job: Job) -> AsyncIterator[str]:  # fmt: skip
    """``pieces`` while the client waits for a whole answer; every half second, a client
    that left cancels the job (which then ends its pieces)."""
    pending = asyncio.ensure_future(anext(pieces, None))
    checked = time.monotonic()
    while True:
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        if time.monotonic() - checked >= 0.5 and not job.cancelled.is_set():
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
        if not done:
            continue
        piece = pending.result()
        if piece is None:
            return
        yield piece
        pending = asyncio.ensure_future(anext(pieces, None))


def _reason(job: Job) -> str:
    return "stop" if job.finish == "stop" else "length"


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int,
                 usage_chunks: bool = False) -> None:  # fmt: skip
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.usage_chunks = usage_chunks  # every chunk has "usage" (null until the last one)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, job: Job) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(job.tokens),
                "total_tokens": self.prompt_tokens + len(job.tokens)}  # fmt: skip

    def whole(self, text: str, job: Job) -> dict:
        usage = self.usage(job)
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
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            out = {**self._head("text_completion"), "choices": [choice]}
        return {**out, "usage": None} if self.usage_chunks else out

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

"""Load on `lowbit serve`: 1, 4 and 16 concurrent clients, each for a fixed time, on localhost.

The server runs in its own process (``lowbit serve MODEL``, loopback); each client is an async
httpx loop that sends a chat completion (greedy, ``--max-tokens`` new tokens, a short question
from a fixed list), waits for the whole answer and sends the next. Per level: requests/s,
generated tokens/s (all clients), p50/p99 latency, p50/p99 time to first token (measured with
streaming), failed requests, and the server's RSS at the start and the end of the level.

    .venv/bin/python benchmarks/serve_load.py [--model smollm2-135m] [--seconds 60] \\
        [--clients 1 4 16] [--max-tokens 64] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from lowbit.eval import format_table
from served import lowbit_server

QUESTIONS = [
    "What is the capital of France?", "Name three uses of a paperclip.",
    "Why is the sky blue?", "Give me a short poem about rain.", "What is 12 times 7?",
    "Describe a cat in one sentence.", "How do plants make food?", "What is a prime number?",
]  # fmt: skip


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _client(url: str, until: float, max_tokens: int, seed: int, out: dict) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        i = seed
        while time.perf_counter() < until:
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True}  # fmt: skip
            i += 1
            start, first, tokens = time.perf_counter(), None, 0
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        out["failed"] += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            first = first or time.perf_counter()
                            tokens += 1
            except httpx.HTTPError:
                out["failed"] += 1
                continue
            out["latency"].append(time.perf_counter() - start)
            out["ttft"].append((first or time.perf_counter()) - start)
            out["chunks"] += tokens


def _level(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    out = {"latency": [], "ttft": [], "chunks": 0, "failed": 0}
    until = time.perf_counter() + seconds

    async def run() -> None:
        await asyncio.gather(*[_client(url, until, max_tokens, i, out) for i in range(clients)])

    start = time.perf_counter()
    asyncio.run(run())
    out["wall"] = time.perf_counter() - start
    return out


def _generated(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lowbit_generated_tokens_total"):
            return float(line.split()[-1])
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args(argv)
    serve = ["serve", args.model, "--max-batch", str(args.max_batch), "--max-queue", "256"]
    with lowbit_server(serve) as (url, server):
        _level(url, 1, 3, 8)  # warm-up
        rows = []
        for clients in args.clients:
            rss0, before = _rss_mb(server.pid), _generated(url)
            r = _level(url, clients, args.seconds, args.max_tokens)
            tokens = _generated(url) - before
            lat, ttft = sorted(r["latency"]), sorted(r["ttft"])

            def pct(v, q):
                return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

            rows.append([clients, len(lat), round(len(lat) / r["wall"], 2),
                         round(tokens / r["wall"], 1), round(statistics.median(lat), 2),
                         round(pct(lat, 0.99), 2), round(statistics.median(ttft), 3),
                         round(pct(ttft, 0.99), 3), r["failed"], round(rss0),
                         round(_rss_mb(server.pid))])  # fmt: skip
    print(f"\n{args.model} served by lowbit on localhost: chat completions, greedy, "
          f"max_tokens {args.max_tokens}, --max-batch {args.max_batch}, {args.seconds:.0f} s per "
          f"level; tokens/s from the server's lowbit_generated_tokens_total\n")  # fmt: skip
    header = ["clients", "requests", "req/s", "generated tok/s", "p50 latency s",
              "p99 latency s", "p50 TTFT s", "p99 TTFT s", "failed", "RSS start MB",
              "RSS end MB"]  # fmt: skip
    print(format_table(header, rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

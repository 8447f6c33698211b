"""`lowbit serve` in its own process for the serving benchmarks: a free loopback port, wait
until /health answers, terminate at the end."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def lowbit_server(args: list[str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of ``python -m lowbit.cli -q <args> --port P`` (``args`` start with
    global options, then ``serve MODEL ...``), ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "-q", *args, "--port",
                               str(port)])  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(30)

"""`lowbit serve`'s command: the socket it listens on and the line that names it."""

import logging

import pytest

from lowbit.cli import main

uvicorn = pytest.importorskip("uvicorn", reason="lowbit serve needs the serve extra")


def test_port_0_names_the_port_it_got(tiny_folder, monkeypatch, caplog):
    """The socket is bound before the model loads and handed to uvicorn, and the log names its
    address (with --port 0, the only way to learn the port)."""
    handed = []

    def run(server, sockets=None):
        handed.extend((s.getsockname()[1], s.fileno() >= 0) for s in sockets)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    with caplog.at_level(logging.INFO, logger="lowbit"):
        assert main(["serve", str(tiny_folder), "--port", "0", "--no-canary"]) == 0
    [(port, open_then)] = handed
    assert port > 0 and open_then
    assert f"listening on http://127.0.0.1:{port} " in caplog.text

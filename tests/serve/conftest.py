"""A real `lowbit serve` (uvicorn on loopback, in a thread) over a tiny random model."""

import argparse
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="lowbit serve needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="lowbit serve needs the serve extra")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, default_folder, **options) -> None:
        folder = options.pop("folder", default_folder)
        from lowbit.cli_serve import build_server

        defaults = {"max_batch": 8, "max_queue": 64, "max_tokens": 64, "max_body": 1 << 20,
                    "api_key": None, "name": "tiny", "ref": None, "shadow_rate": 0.05,
                    "alert_kl": None, "alert_psnr": None, "shadow_window": 50, "canary": True,
                    "canary_every": 10.0, "canary_tolerance": None, "max_images": None,
                    "max_pixels": None, "max_context": None}  # fmt: skip
        args = argparse.Namespace(model=str(folder), **(defaults | options))
        self.app, self.engine = build_server(args)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "server did not start"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()
        if self.engine.shadow is not None:
            self.engine.shadow.close()


@pytest.fixture
def chat_folder(tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}the"
    tok.save_pretrained(tiny_folder)
    # no end-of-sequence token: generations run to max_tokens, so counts are exact
    config = json.loads((tiny_folder / "config.json").read_text())
    (tiny_folder / "config.json").write_text(json.dumps(config | {"eos_token_id": None}))
    (tiny_folder / "generation_config.json").unlink(missing_ok=True)
    return tiny_folder


@pytest.fixture
def serve(chat_folder):
    started = []

    def start(**options) -> Served:
        started.append(Served(chat_folder, **options))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.fixture
def served(monkeypatch, small_sr):
    """Starts servers of image zoo names, with random weights (small generator and upscaler)."""
    import torch

    from lowbit.models.images.dcgan import DCGANGenerator

    def gan() -> DCGANGenerator:
        torch.manual_seed(3)
        return DCGANGenerator(ngf=16).eval()

    monkeypatch.setattr("lowbit.models.images.dcgan_faces", gan)
    monkeypatch.setattr("lowbit.models.images.DCGANGenerator", gan)
    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    started = []

    def start(model: str, **options) -> Served:
        text_only = {"name": None, "max_batch": None, "max_tokens": None}
        started.append(Served(None, folder=model, **(text_only | options)))
        return started[-1]

    yield start
    for s in started:
        s.close()

"""``lowbit serve``: an OpenAI-compatible HTTP server for one model on this host."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from lowbit.cli_args import add_attention_options, apply_attention, port, positive
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  lowbit serve out/w4                       # http://127.0.0.1:8000/v1/...
  lowbit serve out/w4 --api-key "$KEY" --max-batch 16 --port 8080
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

  lowbit serve out/faces-w8a8                # an image generator
  curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
      -d '{"n": 4, "seed": 7}'                  # {"data": [{"b64_json": PNG}, ...], ...}
  lowbit serve out/sr-w8a8                   # a super-resolution model
  { printf '{"image": "'; base64 -w0 photo.jpg; printf '"}'; } | \\
      curl -s localhost:8000/v1/images/upscale -H 'Content-Type: application/json' -d @-

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true for
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus). Requests that wait
together with the same sampling settings are decoded as one batch. An image model (a zoo name,
its lowbit folder or .tflite) answers POST /v1/images/generations (a generator: OpenAI's body
with an empty prompt, plus "seed") or POST /v1/images/upscale (super-resolution: {"image":
base64 file}), with base64 PNGs, one request at a time. Binds to loopback unless --host says
otherwise; put a TLS proxy in front of a public address. For several hosts, export to
compressed-tensors and serve with vLLM.
"""


SHADOW_RATE = 0.05  # --shadow-rate's default


def add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[common], help="an OpenAI-compatible HTTP server for MODEL",
        description="Serve MODEL (a lowbit folder, zoo name, HF folder or id) over an "
        "OpenAI-compatible HTTP API on lowbit's decode loop.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL|DIR")
    add_attention_options(p)  # e.g. --kv-bits 16: a float16 cache, as llama.cpp's server keeps
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port (8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=positive, default=None,
                   help="rows decoded together (8)")  # fmt: skip
    p.add_argument("--max-queue", type=positive, default=None,
                   help="requests allowed to wait; more get HTTP 429 (64; 8 for an image model, "
                   "whose waiting uploads are held in memory)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive, default=None,
                   help="largest max_tokens a request may ask for (1024)")  # fmt: skip
    p.add_argument("--max-context", type=positive, default=None, metavar="TOKENS",
                   help="most tokens a request may hold, prompt and answer (the model's "
                   "context): bounds the key/value cache, which grows to the longest context "
                   "in use on each of --max-batch rows")  # fmt: skip
    p.add_argument("--max-body", type=positive, default=None,
                   help="largest request body in bytes (1 MiB; 32 MiB for an image "
                   "model)")  # fmt: skip
    p.add_argument("--max-images", type=positive, default=None,
                   help="image generators: largest n a request may ask for (16)")  # fmt: skip
    p.add_argument("--max-pixels", type=positive, default=None,
                   help="super-resolution models: largest image to upscale, in pixels "
                   "(2048 x 2048)")  # fmt: skip
    p.add_argument("--name", help="model id reported by /v1/models (default: MODEL)")
    p.add_argument("--ref", metavar="MODEL",
                   help="reference model (the float one) to re-score served requests against: "
                   "KL(ref || served) and top-1 in /metrics (an image model: the PSNR of the "
                   "served images against the reference's)")  # fmt: skip
    p.add_argument("--shadow-rate", type=float, default=SHADOW_RATE,
                   help="with --ref: fraction of requests re-scored (0.05), each on its "
                   "first steps (its served logits kept up to 32 MiB)")  # fmt: skip
    p.add_argument("--alert-kl", type=float,
                   help="with --ref: /health says degraded (and a warning is logged) while "
                   "the mean KL over the last --shadow-window scored requests is above "
                   "it")  # fmt: skip
    p.add_argument("--alert-psnr", type=float, metavar="DB",
                   help="image models, with --ref: /health says degraded while the mean PSNR "
                   "over the last --shadow-window scored requests is below DB")  # fmt: skip
    p.add_argument("--shadow-window", type=positive, default=50,
                   help="requests in the rolling window (50)")  # fmt: skip
    p.add_argument("--canary-every", type=float, default=10.0, metavar="MINUTES",
                   help="check the model against the canary prompts its lowbit folder recorded "
                   "at quantize time: at start and every MINUTES (10; 0: at start only); a KL "
                   "above the recorded tolerance makes /health degraded")  # fmt: skip
    p.add_argument("--canary-tolerance", type=float,
                   help="override the canary KL tolerance recorded in the folder (an image "
                   "model's: the least PSNR in dB)")  # fmt: skip
    p.add_argument("--no-canary", dest="canary", action="store_false",
                   help="do not check the canary prompts")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def build_server(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ASGI app and its engine (started), from parsed ``serve`` arguments."""
    try:
        from lowbit.serve.app import create_app
        from lowbit.serve.base import ServeSettings
        from lowbit.serve.engine import Engine
        from lowbit.serve.metrics import Metrics
    except ImportError as exc:
        raise LowbitError(f"lowbit serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'lowbit[serve]'") from None  # fmt: skip
    from lowbit import api
    from lowbit.cli_image import image_entry

    check_serve_options(args)
    entry = image_entry(args.model, exported=True)
    if entry is not None:
        return _image_server(args, entry)
    for flag, given in (("--max-images", args.max_images), ("--max-pixels", args.max_pixels)):
        if given is not None:
            raise LowbitError(f"{flag} is for image models; {args.model} is a language model")
    from lowbit.runtime import Runtime
    from lowbit.runtime.text import stop_ids

    src = api.load_model(args.model)
    if src.tokenizer is None:
        raise LowbitError(f"{args.model} has no tokenizer; serving text needs one")
    if src.kind == "litert":  # a scoring-only export: refused now, not at every request
        from lowbit.runtime.litert_forward import require_decode

        require_decode(src.model)
    apply_attention(src.model, args)  # --kv-bits: the served model's cache rounded
    metrics = Metrics()

    def on_batch(stats) -> None:
        metrics.decode_tps.set(stats.decode_tps)

    shadow = _shadow(args, metrics)
    runtime = Runtime(src.model)
    if args.max_context is not None:  # a 128k-token model's cache, rows x 128k, is bounded
        runtime.limit = min(args.max_context, runtime.limit or args.max_context)
    batch = args.max_batch or 8
    if src.kind == "litert" and batch > 1:  # a LiteRT export's signatures take one prompt
        log.info("serving a LiteRT export: one request at a time (--max-batch 1)")
        batch = 1
    engine = Engine(runtime, stop_ids(src.tokenizer, src.model), batch, args.max_queue or 64,
                    on_batch, metrics.job_done, shadow, _canary(args, src, metrics))  # fmt: skip
    settings = ServeSettings(args.name or args.model, args.max_tokens or 1024,
                             args.max_body or 1 << 20,
                             args.api_key)  # fmt: skip
    engine.start()
    if shadow is not None:
        shadow.start()
    return create_app(engine, src.tokenizer, settings, metrics), engine


def _image_server(args: argparse.Namespace, entry: Any) -> tuple[Any, Any]:
    """The ASGI app and its worker for the image model ``entry``."""
    from lowbit import api
    from lowbit.serve.base import ServeSettings
    from lowbit.serve.images import ImageWorker, create_image_app
    from lowbit.serve.metrics import Metrics

    for flag, given in (("--alert-kl", args.alert_kl), ("--max-batch", args.max_batch),
                        ("--max-tokens", args.max_tokens), ("--max-context", args.max_context),
                        ("--kv-bits", getattr(args, "kv_bits", None))):  # fmt: skip
        if given is not None:
            raise LowbitError(f"{flag} is for language models; {args.model} is an image model "
                              f"(see --max-images, --max-pixels, --alert-psnr)")  # fmt: skip
    metrics = Metrics()
    shadow = _image_shadow(args, entry, metrics)
    src = api.load_model(args.model)
    settings = ServeSettings(args.name or args.model, max_body=args.max_body or 32 << 20,
                             api_key=args.api_key, max_images=args.max_images or 16,
                             max_pixels=args.max_pixels or 2048 * 2048)  # fmt: skip
    worker = ImageWorker(args.max_queue or 8, shadow, _canary(args, src, metrics))
    if shadow is not None:
        shadow.start()
    worker.watch_canary()
    return create_image_app(entry, src.model, worker, settings, metrics), worker


def _image_shadow(args: argparse.Namespace, entry: Any, metrics: Any) -> Any:
    """The image model's quality monitor for ``--ref`` (the same architecture), or None."""
    from lowbit.cli_image import image_entry

    if not _wants_shadow(args, args.alert_psnr, "--alert-psnr"):
        return None
    ref_entry = image_entry(args.ref, exported=True)
    if ref_entry is None or ref_entry.name != entry.name:
        raise LowbitError(f"--ref {args.ref}: not a form of {entry.name} (the float zoo model "
                          f"{entry.name}, or a folder or .tflite made from it)")  # fmt: skip
    from lowbit import api
    from lowbit.serve.image_shadow import ImageShadow

    ref = api.load_model(args.ref).model
    return ImageShadow(ref, args.shadow_rate, args.alert_psnr, metrics, args.shadow_window)


def _wants_shadow(args: argparse.Namespace, alert: float | None, flag: str) -> bool:
    """Whether ``--ref`` asks for a monitor (its options checked)."""
    if args.ref is None:
        if alert is not None:
            raise LowbitError(f"{flag} needs --ref (the model to compare against)")
        return False
    if not 0 < args.shadow_rate <= 1:
        raise LowbitError(f"--shadow-rate must be in (0, 1], got {args.shadow_rate}")
    return True


def check_serve_options(args: argparse.Namespace) -> None:
    """What the parser's types cannot say: an empty --api-key (an unset variable in
    --api-key "$KEY" would serve without one), a canary period that is not a number."""
    if args.api_key is not None and not args.api_key.strip():
        raise LowbitError("--api-key is empty (an unset variable?); give a key, or leave the "
                          "option out to serve without one")  # fmt: skip
    if not args.canary_every >= 0 or args.canary_every == float("inf"):
        raise LowbitError(f"--canary-every is a number of minutes >= 0, got {args.canary_every}")
    for flag, value in (
        ("--canary-tolerance", args.canary_tolerance),
        ("--alert-kl", args.alert_kl),
        ("--alert-psnr", args.alert_psnr),
    ):
        if value is not None and not 0 <= value < float("inf"):  # (NaN: degraded for ever)
            raise LowbitError(f"{flag} is a number >= 0, got {value}")
    if args.ref is None and args.shadow_rate != SHADOW_RATE:
        raise LowbitError("--shadow-rate needs --ref (the model the served requests are "
                          "re-scored against)")  # fmt: skip


def _shadow(args: argparse.Namespace, metrics: Any) -> Any:
    """The quality monitor for ``--ref``, or None."""
    if args.alert_psnr is not None:
        raise LowbitError(f"--alert-psnr is for image models; {args.model} is a language model "
                          f"(--alert-kl watches its quality)")  # fmt: skip
    if not _wants_shadow(args, args.alert_kl, "--alert-kl"):
        return None
    from lowbit import api
    from lowbit.serve.shadow import Shadow

    ref = api.load_model(args.ref).model
    return Shadow(ref, args.shadow_rate, args.alert_kl, metrics, args.shadow_window)


def _canary(args: argparse.Namespace, src: Any, metrics: Any) -> Any:
    """The canary watch for a lowbit folder that recorded canary prompts, or None."""
    if args.canary_every < 0:
        raise LowbitError(f"--canary-every must be 0 or more minutes, got {args.canary_every}")
    if not args.canary or not (src.manifest or {}).get("canary"):
        if args.canary and src.kind == "lowbit":
            log.info("%s records no canary prompts: no canary checks", args.model)
        return None
    from lowbit.serve.canary_watch import CanaryWatch

    return CanaryWatch(src.model, src.folder, src.manifest, metrics, 60 * args.canary_every,
                       args.canary_tolerance)  # fmt: skip


def bind(host: str, number: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds (its address family, ``SO_REUSEADDR``) and
    before the model loads, so the port cannot be taken meanwhile and ``--port 0`` names the
    port it got; a one-line error where ``host:number`` cannot be listened on (in use, or
    not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, number))
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise LowbitError(f"cannot listen on {host}:{number} ({why}); choose another --port or "
                          f"--host") from None  # fmt: skip
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the server is reachable beyond this machine", args.host)
    sock = bind(args.host, args.port)  # before the model loads (uvicorn's own error: exit 3)
    with sock:
        app, engine = build_server(args)
        import uvicorn

        port = sock.getsockname()[1]
        where = f"[{args.host}]" if ":" in args.host else args.host
        log.info("listening on http://%s:%d (API under /v1, /health, /metrics)", where, port)
        config = uvicorn.Config(app, host=args.host, port=port, log_level="warning",
                                timeout_graceful_shutdown=5)  # fmt: skip
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.close()  # an Engine, or an image model's ImageWorker
            if engine.shadow is not None:
                engine.shadow.close()
    return 0

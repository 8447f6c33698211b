"""`lowbit serve` on an image model against the same model called in this process: what the
HTTP layer (JSON, base64, PNG, the queue) costs per image.

Protocol: the server runs in its own process (``lowbit serve MODEL --threads N``, loopback);
in this process the same model (loaded the same way, on its kernels, ``N`` torch threads)
does the same work as ``lowbit generate`` does: a super-resolution model upscales one image
(default: the 256 x 256 centre of scikit-image's ``astronaut``) in windows of 256, a
generator draws ``--n`` samples; both encode PNGs. Rows alternate, in-process then HTTP with
1 client then HTTP with 2 clients, for ``--rounds`` rounds of ``--seconds`` each; the server
idles while this process works. Images/s per row (medians over rounds), and the HTTP rows'
p50 / p99 latency per request (all rounds).

    .venv/bin/python benchmarks/serve_images.py [MODEL] [--threads 2] [--seconds 10]
        [--rounds 3] [--n 16] [--image PATH]

MODEL: an image zoo name, a lowbit folder of one or its .tflite (default waifu2x-upconv7).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

from lowbit.eval import format_table
from served import lowbit_server


def _direct(model, entry, job, seconds: float) -> float:
    """Images/s of the in-process work for ``seconds``."""
    from lowbit.eval.image import outputs
    from lowbit.models.images.run import png_bytes, upscale_image
    from lowbit.models.images.tiles import DEFAULT_TILE, upscaler

    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if entry.sample is None:
            out = [
                upscale_image(upscaler(model, entry.halo, DEFAULT_TILE), job, entry.output_range)
            ]
        else:
            out = list(outputs(model, entry.sample(len(job), 0), entry.output_range))
        done += len([png_bytes(image) for image in out])
    return done / (time.perf_counter() - start)


def _http(url: str, path: str, body: dict, clients: int, seconds: float, lat: list) -> float:
    """Images/s over HTTP with ``clients`` clients posting back to back for ``seconds``."""
    images = 0

    async def client(until: float) -> None:
        nonlocal images
        async with httpx.AsyncClient(timeout=300) as c:
            while time.perf_counter() < until:
                start = time.perf_counter()
                r = await c.post(url + path, json=body)
                r.raise_for_status()
                lat.append(time.perf_counter() - start)
                images += len(r.json()["data"])

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*[client(until) for _ in range(clients)])

    start = time.perf_counter()
    asyncio.run(run())
    return images / (time.perf_counter() - start)


def _job(entry, args) -> tuple:
    """(in-process input, HTTP path, HTTP body, what is timed)."""
    if entry.sample is not None:
        what = f"{args.n} samples per request"
        return entry.sample(args.n, 0), "/v1/images/generations", {"n": args.n, "seed": 0}, what
    import io

    from PIL import Image

    from lowbit.models.images.data import image_from_bytes

    if args.image:
        data = Path(args.image).read_bytes()
    else:
        from skimage import data as samples

        array = samples.astronaut()[128:384, 128:384]
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
    image = image_from_bytes(data, entry.channels, 1 << 26)
    h, w = image.pixels.shape[-2:]
    body = {"image": base64.b64encode(data).decode()}
    return image.pixels, "/v1/images/upscale", body, f"one {w}x{h} image per request"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="waifu2x-upconv7")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=16, help="generators: samples per request")
    p.add_argument("--image", help="super-resolution: the image (default: astronaut's centre)")
    args = p.parse_args()
    from lowbit import api
    from lowbit.cli_image import image_entry

    entry = image_entry(args.model, exported=True)
    if entry is None:
        raise SystemExit(f"{args.model} is not an image model")
    torch.set_num_threads(args.threads)
    model = api.load_model(args.model).model
    job, path, body, what = _job(entry, args)
    rates: dict[str, list[float]] = {"in-process": [], "HTTP, 1 client": [], "HTTP, 2 clients": []}
    latency: dict[str, list[float]] = {k: [] for k in rates}
    serve = ["--threads", str(args.threads), "serve", args.model, "--no-canary"]
    with lowbit_server(serve) as (url, _):
        _direct(model, entry, job, 1.0)  # warm-up, both sides
        _http(url, path, body, 1, 1.0, [])
        with torch.inference_mode():
            for _ in range(args.rounds):
                rates["in-process"].append(_direct(model, entry, job, args.seconds))
                for clients in (1, 2):
                    key = f"HTTP, {clients} client{'s' if clients > 1 else ''}"
                    rates[key].append(_http(url, path, body, clients, args.seconds, latency[key]))

    def pct(values: list[float], q: float) -> str:
        v = sorted(values)
        return f"{1000 * v[min(len(v) - 1, int(q * len(v)))]:.0f}" if v else ""

    base = statistics.median(rates["in-process"])
    rows = [[k, f"{statistics.median(v):.2f}", f"{statistics.median(v) / base:.2f}",
             " ".join(f"{x:.2f}" for x in v), pct(latency[k], 0.5), pct(latency[k], 0.99)]
            for k, v in rates.items()]  # fmt: skip
    print(f"\n{args.model}: {what}, {args.threads} threads, {args.rounds} alternating rounds of "
          f"{args.seconds:.0f} s\n")  # fmt: skip
    header = ["row", "images/s (median)", "x in-process", "each round", "p50 ms", "p99 ms"]
    print(format_table(header, rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

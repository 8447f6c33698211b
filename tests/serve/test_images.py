"""`lowbit serve` on an image model: a generator's samples and a super-resolution model's
upscales over HTTP, equal to what `lowbit generate` writes; bad requests get 4xx errors."""

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.cli import main
from lowbit.errors import LowbitError

httpx = pytest.importorskip("httpx", reason="lowbit serve needs the serve extra")
pytest.importorskip("fastapi", reason="lowbit serve needs the serve extra")
from lowbit.serve.engine import QueueFull  # noqa: E402
from lowbit.serve.images import ImageWorker  # noqa: E402


def _pixels(b64: str) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image), image.mode


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_generator_serves_the_samples_generate_writes(served, tmp_path):
    server = served("dcgan-faces", max_images=4)
    url = f"{server.url}/v1/images/generations"
    r = httpx.post(url, json={"prompt": "", "n": 3, "seed": 5, "size": "64x64"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 5 and body["size"] == "64x64" and len(body["data"]) == 3
    assert main(["generate", "dcgan-faces", "--count", "3", "--seed", "5", "--out",
                 str(tmp_path / "cli")]) == 0  # fmt: skip
    for i, item in enumerate(body["data"]):
        got, mode = _pixels(item["b64_json"])
        want = np.asarray(Image.open(tmp_path / "cli" / f"sample_{i:04d}.png"))
        assert mode == "RGB" and np.array_equal(got, want)
    unseeded = [httpx.post(url, json={"n": 1}, timeout=60).json() for _ in range(2)]
    assert unseeded[0]["seed"] != unseeded[1]["seed"]  # a fresh seed each time, reported
    bad = [
        ("prompt", "a cat", "takes no prompt"),
        ("n", 5, "n is at most 4"),
        ("size", "128x128", "draws 64x64 images"),
        ("response_format", "url", "b64_json"),
    ]
    for field, value, message in bad:
        r = httpx.post(url, json={field: value}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (field, r.text)
    r = httpx.post(f"{server.url}/v1/images/upscale", json={"image": "aGk="}, timeout=60)
    assert r.status_code == 400 and "/v1/images/generations" in r.text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "lowbit_images_total 5.0" in metrics
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "dcgan-faces"


def test_a_super_resolution_model_serves_the_upscale_generate_writes(served, tmp_path):
    server = served("waifu2x-upconv7", max_pixels=40 * 40, max_body=20_000)
    url = f"{server.url}/v1/images/upscale"
    rng = np.random.default_rng(0)
    photo, grey = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((30, 36, 3), (20, 24)))
    wide = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    for name, array in (("photo", photo), ("grey", grey), ("wide", wide)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        upload = base64.b64encode((tmp_path / f"{name}.png").read_bytes()).decode()
        r = httpx.post(url, json={"image": upload}, timeout=60)
        assert r.status_code == 200, r.text
        h, w = array.shape[:2]
        assert r.json()["size"] == f"{2 * w}x{2 * h}"
        got, mode = _pixels(r.json()["data"][0]["b64_json"])
        out = tmp_path / f"{name}-2x.png"
        assert main(["generate", "waifu2x-upconv7", "--image", str(tmp_path / f"{name}.png"),
                     "--out", str(out)]) == 0  # fmt: skip
        want = Image.open(out)
        assert mode == want.mode and np.array_equal(got, np.asarray(want)), name
    big = _png(rng.integers(0, 256, (41, 40, 3), dtype=np.uint8))
    huge = base64.b64encode(bytes(20_000)).decode()
    cases = [
        ({"image": "not base64!"}, 400, "not base64"),
        ({"image": base64.b64encode(b"hello").decode()}, 400, "not a readable image"),
        ({"image": big}, 400, "at most 1600"),
        ({"image": huge}, 413, "body over"),
        ({"image": _png(np.zeros((8, 8, 4), np.uint8)).upper()}, 400, "not a readable"),
    ]
    for body, status, message in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/v1/images/generations", json={"n": 1}, timeout=60)
    assert r.status_code == 400 and "/v1/images/upscale" in r.text


def test_the_worker_bounds_its_queue_and_forgets_requests_dropped_while_waiting():
    worker = ImageWorker(max_queue=2)
    gate = threading.Event()
    first = worker.submit(gate.wait)
    while not worker.busy:
        pass
    waiting = [worker.submit(lambda: 1), worker.submit(lambda: 2)]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        worker.submit(lambda: 3)
    assert waiting[0].cancel() and worker.waiting == 1  # its client left: the slot is free
    third = worker.submit(lambda: 3)
    gate.set()
    assert first.result(10) and waiting[1].result(10) == 2 and third.result(10) == 3
    assert worker.waiting == 0
    worker.close()


def _scored(server, count: int) -> dict:
    for _ in range(200):
        health = httpx.get(f"{server.url}/health").json()
        if health["shadow"]["scored"] >= count:
            return health
        time.sleep(0.05)
    raise AssertionError(f"shadow scoring did not catch up: {health}")


def test_shadow_scoring_measures_psnr_against_the_reference(served, tmp_path):
    """Every request re-run on the float model: a W4 folder's samples score below identity, an
    alert above it makes /health degraded, the float model against itself is identical."""
    folder = tmp_path / "w4"
    assert main(["quantize", "dcgan-faces", "--recipe", "w4-rtn-g32", "--out", str(folder),
                 "-q"]) == 0  # fmt: skip
    watch = {"ref": "dcgan-faces", "shadow_rate": 1.0}
    ok = served(str(folder), alert_psnr=10.0, **watch)
    bad = served(str(folder), alert_psnr=99.5, **watch)
    same = served("dcgan-faces", **watch)
    for server in (ok, bad, same):
        for seed in (1, 2):
            url = f"{server.url}/v1/images/generations"
            assert httpx.post(url, json={"n": 2, "seed": seed}, timeout=60).status_code == 200
    healthy, degraded, identical = (_scored(s, 2) for s in (ok, bad, same))
    db = healthy["shadow"]["psnr_rolling"]
    assert 10 < db < 99 and healthy["status"] == "ok", healthy  # the outputs differ
    assert degraded["status"] == "degraded" and degraded["shadow"]["psnr_rolling"] == db
    assert identical["shadow"]["psnr_rolling"] == 100.0 and identical["status"] == "ok"
    metrics = httpx.get(f"{bad.url}/metrics").text
    assert "lowbit_shadow_psnr_rolling" in metrics and "lowbit_shadow_psnr_count 2.0" in metrics


def test_options_for_the_other_kind_of_model_are_refused(served, serve, tmp_path):
    with pytest.raises(LowbitError, match="--alert-kl is for language models"):
        served("dcgan-faces", ref="dcgan-faces", alert_kl=0.1)
    with pytest.raises(LowbitError, match="--max-batch is for language models"):
        served("dcgan-faces", max_batch=4)
    with pytest.raises(LowbitError, match="--max-pixels is for image models"):
        serve(max_pixels=100)
    with pytest.raises(LowbitError, match="not a form of dcgan-faces"):
        served("dcgan-faces", ref="waifu2x-upconv7")
    with pytest.raises(LowbitError, match="--alert-psnr needs --ref"):
        served("dcgan-faces", alert_psnr=30.0)


def test_an_image_folders_canary_is_checked_at_start_and_flags_a_stricter_tolerance(
    served, tmp_path
):
    folder = tmp_path / "w8a8"
    assert main(["-q", "quantize", "waifu2x-upconv7", "--recipe", "conv-w8a8-static", "--out",
                 str(folder)]) == 0  # fmt: skip
    recorded = json.loads((folder / "lowbit.json").read_text())["canary"]["psnr"]
    ok = served(str(folder))
    strict = served(str(folder), canary_tolerance=recorded + 1)
    healthy, degraded = (_checked(s) for s in (ok, strict))
    assert healthy["status"] == "ok" and healthy["canary"]["psnr"] == pytest.approx(recorded)
    assert degraded["status"] == "degraded" and degraded["canary"]["status"] == "degraded"
    assert "lowbit_canary_psnr" in httpx.get(f"{ok.url}/metrics").text
    idle = served(str(folder), canary_every=0.5 / 60)  # every half second, no request sent
    for _ in range(200):
        lines = httpx.get(f"{idle.url}/metrics").text.splitlines()
        ok_checks = [float(x.split()[-1]) for x in lines
                     if x.startswith('lowbit_canary_checks_total{result="ok"}')]  # fmt: skip
        if ok_checks and ok_checks[0] >= 3:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the idle server's canary was not checked again")


def _checked(server) -> dict:
    for _ in range(200):
        health = httpx.get(f"{server.url}/health").json()
        if health.get("canary"):
            return health
        time.sleep(0.05)
    raise AssertionError(f"no canary check: {health}")


def test_a_failing_or_slow_model_gets_openai_errors_and_a_full_queue_429(served, monkeypatch,
                                                                         small_sr):  # fmt: skip
    """The worker decodes and runs the model: the model's failure is a JSON 500, a full queue a
    429; an upload over --max-pixels is refused from its header, before Pillow decodes it."""

    class Moody(torch.nn.Module):
        halo, pad = 7, 7

        def __init__(self) -> None:
            super().__init__()
            self.inner = small_sr()

        def forward(self, x):
            if x.shape[-1] == 33:  # the one image this model fails on
                raise RuntimeError("out of memory (pretend)")
            time.sleep(1.0)  # long enough for the burst below to find it busy
            return self.inner(x)

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", Moody)
    server = served("waifu2x-upconv7", max_queue=1, max_pixels=40 * 40)
    url = f"{server.url}/v1/images/upscale"
    rng = np.random.default_rng(0)
    failing = _png(rng.integers(0, 256, (20, 33, 3), dtype=np.uint8))
    r = httpx.post(url, json={"image": failing}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "out of memory" not in r.text  # logged, not sent
    fine = _png(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(url, json={"image": fine})
                                          for _ in range(4)])  # fmt: skip

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes[0] == 200 and codes[-1] == 429, codes
    big = _png(rng.integers(0, 256, (41, 40, 3), dtype=np.uint8))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    r = httpx.post(url, json={"image": big}, timeout=60)
    assert r.status_code == 400 and "at most 1600" in r.text


def test_the_openai_client_generates_images(served):
    openai = pytest.importorskip("openai")
    server = served("dcgan-faces", api_key="sekret")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret")
    result = client.images.generate(model="dcgan-faces", prompt="", n=2, size="64x64",
                                    response_format="b64_json")  # fmt: skip
    assert len(result.data) == 2
    pixels, mode = _pixels(result.data[0].b64_json)
    assert pixels.shape == (64, 64, 3) and mode == "RGB"
    with pytest.raises(openai.BadRequestError, match="takes no prompt"):
        client.images.generate(model="dcgan-faces", prompt="a face", n=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").images.generate(prompt="")

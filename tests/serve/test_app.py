"""`lowbit serve` as clients see it: the official OpenAI client, plain HTTP, abuse, metrics."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from lowbit import api
from lowbit.runtime import Runtime
from lowbit.runtime.text import stop_ids


def greedy_text(folder, prompt: str, n: int) -> str:
    src = api.load_model(str(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt)["input_ids"]
    out = Runtime(src.model).generate([ids], n, stop_ids=stop_ids(tok, src.model)).tokens[0]
    return tok.decode(out, skip_special_tokens=True)


def test_openai_client_streams_a_chat_completion(serve, chat_folder):
    openai = pytest.importorskip("openai")
    server = serve(api_key="sekret")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret")
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    *chunks, last = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and text.strip()
    assert all(c.usage is None for c in chunks) and last.choices == []
    assert last.usage.completion_tokens == 8 and last.usage.total_tokens > 8
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the quick brown fox"}],
        max_tokens=8, temperature=0)  # fmt: skip
    assert whole.choices[0].message.content.split() == text.split()
    assert whole.usage.completion_tokens == 8
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()


def test_completion_is_the_greedy_decode(serve, chat_folder):
    server = serve()
    r = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "a stitch in time", "max_tokens": 10, "temperature": 0})  # fmt: skip
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 10
    assert body["choices"][0]["text"].split() == greedy_text(chat_folder, "a stitch in time",
                                                             10).split()  # fmt: skip


@pytest.mark.parametrize("payload,status,code", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "the", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "", "max_tokens": 4}).encode(), 400, None),
    (json.dumps({"prompt": "   ", "max_tokens": 4}).encode(), 400, None),
    (json.dumps({"prompt": "the", "temperature": -1}).encode(), 400, None),
    (json.dumps({"prompt": "the " * 250, "max_tokens": 20}).encode(), 400, "context_length"),
    (b"x" * (10 << 20), 413, "body_too_large"),
    (json.dumps({"prompt": "the", "seed": 2**64}).encode(), 400, None),
    (json.dumps({"prompt": "the", "seed": -1}).encode(), 400, None),
    (json.dumps({"prompt": "the", "max_tokens": True}).encode(), 400, None),
    (json.dumps({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, None),
    (json.dumps({"prompt": "the", "stop": ""}).encode(), 400, None),
    (b"[" * 100_000, 400, None),
])  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_stays_up(serve, payload, status, code):
    server = serve()
    r = httpx.post(f"{server.url}/v1/completions", content=payload,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == status
    assert r.json()["error"]["message"] and r.json()["error"]["code"] == code
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_answers_429_and_the_rest_complete(serve):
    server = serve(max_queue=4, max_batch=2)

    async def flood():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": "the lazy dog", "max_tokens": 16, "temperature": 0}
            return await asyncio.gather(*[client.post(f"{server.url}/v1/completions", json=body)
                                          for _ in range(120)])  # fmt: skip

    codes = [r.status_code for r in asyncio.run(flood())]
    assert set(codes) == {200, 429} and codes.count(200) >= 4
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_client_that_leaves_mid_stream_is_cancelled(serve):
    server = serve(max_batch=1, max_tokens=240)
    _slow_steps(server)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={
            "prompt": "the", "max_tokens": 240, "stream": True}) as r:  # fmt: skip
        next(r.iter_lines())  # the first event, then hang up
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the dog", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lowbit_finished_requests_total{reason="cancelled"} 1.0' in metrics


def test_a_client_that_leaves_a_whole_answer_is_cancelled(serve):
    server = serve(max_batch=1, max_tokens=240)
    _slow_steps(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "the", "max_tokens": 240},
                   timeout=0.3)  # fmt: skip
    deadline = time.time() + 20
    while time.time() < deadline and server.engine.busy + server.engine.depth():
        time.sleep(0.05)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lowbit_finished_requests_total{reason="cancelled"} 1.0' in metrics


def _slow_steps(server) -> None:
    """Steps of 5 ms that release the GIL, as a real model's do (the tiny one's are so fast
    that the server may not see a hang-up before the last of 240 tokens)."""
    real = server.engine.runtime.forward_for

    class Slow:
        def __init__(self, forward):
            self.forward = forward

        def new_cache(self, *args):
            return self.forward.new_cache(*args)

        def __call__(self, *args, **kwargs):
            time.sleep(0.005)
            return self.forward(*args, **kwargs)

    server.engine.runtime.forward_for = lambda capacity: Slow(real(capacity))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_texts_end_the_answer_before_them(serve, chat_folder, stream):
    server = serve()
    prompt = "a stitch in time"
    whole = greedy_text(chat_folder, prompt, 24)
    words = whole.split()
    stop = f" {words[3]}" if whole.startswith(" ") else words[3]
    cut = whole[: whole.index(stop)] if stop in whole else None
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop, "never"],
            "stream": stream}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        text = "".join(e["choices"][0]["text"] for e in events)
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
    assert cut is not None and text == cut and finish == "stop"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lowbit_finished_requests_total{reason="stop"} 1.0' in metrics


def test_chat_without_max_tokens_gets_what_the_context_leaves(serve):
    server = serve(max_tokens=1024)  # more than the tiny model's context of 256
    r = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "the quick brown fox"}]})  # fmt: skip
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256


def test_max_context_bounds_prompt_and_answer(serve):
    server = serve(max_context=40)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the " * 30, "max_tokens": 20})
    assert r.status_code == 400 and "context of 40 tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "the quick brown fox"}]})  # fmt: skip
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 40  # what the context leaves


def test_chat_messages_the_template_refuses_are_a_400(serve, chat_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_folder)
    tok.chat_template = ("{% if messages|length > 1 %}{{ raise_exception('roles must "
                         "alternate') }}{% endif %}{{ messages[0]['content'] }}")  # fmt: skip
    tok.save_pretrained(chat_folder)
    server = serve()
    two = [{"role": "user", "content": "the"}, {"role": "user", "content": "dog"}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": two, "max_tokens": 2})
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
    surrogate = b'{"messages": [{"role": "user", "content": "the \\udfff"}], "max_tokens": 2}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=surrogate,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_a_generation_that_fails_mid_stream_ends_with_an_error_event(serve):
    openai = pytest.importorskip("openai")
    server = serve(max_batch=1)
    real = server.engine.runtime.forward_for

    class Failing:
        calls = 0

        def __init__(self, forward):
            self.forward = forward

        def new_cache(self, *args):
            return self.forward.new_cache(*args)

        def __call__(self, *args, **kwargs):
            Failing.calls += 1
            if Failing.calls > 3:
                raise RuntimeError("out of memory")
            return self.forward(*args, **kwargs)

    server.engine.runtime.forward_for = lambda capacity: Failing(real(capacity))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    with pytest.raises(openai.APIError, match="out of memory"):
        list(client.completions.create(model="tiny", prompt="the", max_tokens=20, stream=True))
    server.engine.runtime.forward_for = real
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the", "max_tokens": 3})
    assert ok.status_code == 200


def test_concurrent_requests_share_a_batch_and_get_their_own_tokens(serve, chat_folder):
    server = serve(max_batch=8)
    batches = []
    previous = server.engine.on_batch
    server.engine.on_batch = lambda stats: (batches.append(stats.rows), previous(stats))
    prompts = ["the quick brown fox", "a stitch", "all that glitters is not gold", "the"]

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{server.url}/v1/completions", json={
                "prompt": p, "max_tokens": 6 + i, "temperature": 0})
                for i, p in enumerate(prompts)])  # fmt: skip

    results = asyncio.run(together())
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        assert r.json()["choices"][0]["text"].split() == greedy_text(chat_folder, p, 6 + i).split()
    assert max(batches) > 1


def test_metrics_are_prometheus_text(serve):
    server = serve()
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "the", "max_tokens": 3})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("lowbit_requests_total", "lowbit_time_to_first_token_seconds_bucket",
                 "lowbit_generated_tokens_total", "lowbit_queue_depth",
                 "process_resident_memory_bytes"):  # fmt: skip
        assert name in text, name
    for path in ("/nope-1", "/nope-2"):
        assert httpx.get(f"{server.url}{path}").json()["error"]["message"]  # OpenAI's shape
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405
    text = httpx.get(f"{server.url}/metrics").text
    assert "nope" not in text  # no series per path a client makes up
    assert 'lowbit_requests_total{endpoint="other",status="404"} 2.0' in text


def _quantized_and_damaged(chat_folder, tmp_path):
    """A W4 folder of the tiny model, and a copy with one layer's scales zeroed on disk."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lowbit.cli import main

    good, bad = tmp_path / "w4", tmp_path / "w4-damaged"
    assert main(["-q", "quantize", str(chat_folder), "--recipe", "w4-rtn-g32", "--out",
                 str(good)]) == 0  # fmt: skip
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    for name in [k for k in tensors if k.endswith("layers.1.mlp.down_proj.scale")]:
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return good, bad


def _health_after(server, requests: int) -> dict:
    for i in range(requests):
        body = {"prompt": ["the quick brown fox", "a stitch in time", "the lazy dog"][i % 3],
                "max_tokens": 12, "temperature": 0}  # fmt: skip
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:  # scoring runs in the background
        health = httpx.get(f"{server.url}/health").json()
        if health["shadow"]["scored"] >= requests:
            return health
        time.sleep(0.1)
    raise AssertionError(f"shadow scoring did not catch up: {health}")


def test_shadow_scoring_flags_a_damaged_folder(serve, chat_folder, tmp_path):
    """Served against the float model with every request shadowed: the undamaged W4 folder
    stays ok, the one with zeroed scales raises the KL gauge past the alert and flips /health."""
    good, bad = _quantized_and_damaged(chat_folder, tmp_path)
    # this tiny random model's residual stream is mostly its embeddings: one layer moves the
    # logits little (measured here: KL ~1.6e-4 undamaged, ~1.3e-3 damaged), hence the alert
    watch = {"ref": str(chat_folder), "shadow_rate": 1.0, "alert_kl": 5e-4, "canary": False}
    healthy = _health_after(serve(folder=good, **watch), 4)
    assert healthy["status"] == "ok" and healthy["shadow"]["kl_rolling"] < 5e-4
    server = serve(folder=bad, **watch)
    damaged = _health_after(server, 4)
    assert damaged["status"] == "degraded" and damaged["shadow"]["kl_rolling"] > 5e-4
    assert damaged["shadow"]["kl_rolling"] > 5 * healthy["shadow"]["kl_rolling"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "lowbit_shadow_kl_rolling" in metrics and "lowbit_shadow_top1_bucket" in metrics


def _canary_health(server) -> dict:
    deadline = time.time() + 30
    while time.time() < deadline:  # the engine checks at start, between batches
        health = httpx.get(f"{server.url}/health").json()
        if health.get("canary"):
            return health
        time.sleep(0.05)
    raise AssertionError(f"no canary check: {health}")


def test_canary_prompts_flag_a_damaged_folder_without_a_reference(serve, chat_folder, tmp_path):
    """No --ref: the folder's canary (recorded at quantize time) keeps the undamaged folder
    ok and turns /health degraded for the copy with zeroed scales; the next request is still
    served."""
    good, bad = _quantized_and_damaged(chat_folder, tmp_path)
    healthy = _canary_health(serve(folder=good))
    assert healthy["status"] == "ok" and healthy["canary"]["status"] == "ok"
    assert healthy["canary"]["kl"] <= healthy["canary"]["tolerance"]
    server = serve(folder=bad)
    damaged = _canary_health(server)
    assert damaged["status"] == "degraded" and damaged["canary"]["status"] == "degraded"
    assert damaged["canary"]["kl"] > 3 * healthy["canary"]["kl"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lowbit_canary_checks_total{result="degraded"} 1.0' in metrics
    assert "lowbit_canary_kl " in metrics and "lowbit_canary_tolerance " in metrics
    body = {"prompt": "the quick brown fox", "max_tokens": 4}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    quiet = serve(folder=bad, canary=False)  # --no-canary: no check, no verdict
    assert httpx.get(f"{quiet.url}/health").json()["status"] == "ok"


def test_kv_bits_rounds_the_served_model_cache(serve, chat_folder):
    from lowbit.nn.attention import ATTRIBUTE

    server = serve(kv_bits=16, query_bits=None, kv_group=None, kv_hadamard=False,
                   kv_center=False)  # fmt: skip
    model = server.engine.runtime.model
    assert all(getattr(layer.self_attn, ATTRIBUTE).kv_bits == 16 for layer in model.model.layers)
    r = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "a stitch in time", "max_tokens": 6, "temperature": 0})  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6

"""The ASGI layers in front of `lowbit serve`'s routes: body size, API key, request counts."""

import socket
import time

import httpx


def test_a_chunked_body_over_the_limit_is_a_413_before_the_routes(serve):
    server = serve(max_body=4096)

    def chunks():  # no Content-Length: the body arrives in pieces
        for _ in range(4):
            yield b"x" * 2048

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(),
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the", "max_tokens": 2})
    assert small.status_code == 200


def test_refused_requests_are_counted_by_route(serve):
    """Refusals count under their status; a client that hangs up halfway through its body
    counts as 499 (it was counted as the server's 500); a key outside ASCII matches the UTF-8
    bytes clients send (it was compared after a Latin-1 decode)."""
    server = serve(api_key="clé", max_body=512)
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"}).status_code == 401
    key = {"Authorization": "Bearer clé".encode()}
    big = httpx.post(f"{server.url}/v1/completions", content=b"x" * 1024, headers=key)
    assert big.status_code == 413
    with socket.create_connection(("127.0.0.1", server.port)) as c:
        c.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cl\xc3\xa9"
            b'\r\nContent-Length: 100\r\n\r\n{"prompt":'
        )  # 10 of 100 bytes, then gone
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1},
                    headers=key)  # fmt: skip
    assert ok.status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for status in (401, 413, 200):
        assert f'lowbit_requests_total{{endpoint="/v1/completions",status="{status}"}} 1.0' in text
    deadline = time.time() + 10  # (the server sees the hang-up on its own time)
    while '/v1/completions",status="499"} 1.0' not in text and time.time() < deadline:
        time.sleep(0.05)
        text = httpx.get(f"{server.url}/metrics").text
    assert '/v1/completions",status="499"} 1.0' in text and 'status="500"' not in text

"""The ASGI layers in front of `lowbit serve`'s routes: body size, API key, request counts."""

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
    server = serve(api_key="k", max_body=512)
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"}).status_code == 401
    big = httpx.post(f"{server.url}/v1/completions", content=b"x" * 1024,
                     headers={"Authorization": "Bearer k"})  # fmt: skip
    assert big.status_code == 413
    text = httpx.get(f"{server.url}/metrics").text
    assert 'lowbit_requests_total{endpoint="/v1/completions",status="401"} 1.0' in text
    assert 'lowbit_requests_total{endpoint="/v1/completions",status="413"} 1.0' in text

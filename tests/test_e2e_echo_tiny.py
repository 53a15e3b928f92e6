"""End to end on loopback, over both transports: a real server, real HTTP."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest


@pytest.fixture(scope="module", params=["fast", "litserve"])
def echo_server(request, serve_module):
    return serve_module(["model=echo", f"server.transport={request.param}", "tracing=none", "cache=none"])


@pytest.fixture(scope="module")
def tiny_server(serve_module, tiny_dir):
    return serve_module(["model=tiny", f"model.path={tiny_dir}", "tracing=none", "cache=none"])


def test_echo_round_trip(echo_server):
    with httpx.Client(base_url=echo_server.url, timeout=10) as client:
        r = client.post("/predict", json={"input": "hello"})
        assert r.status_code == 200, r.text
        assert r.json() == {"output": "hello"}
        r = client.post("/predict", json={"input": ["a", {"b": 1}, 3]})
        assert r.json() == {"output": ["a", {"b": 1}, 3]}
        assert client.get("/health").status_code == 200
        info = client.get("/info").json()
        assert info["config"]["model"]["name"] == "echo"
        assert info["plugins"]["model"]["origin"] == "built-in"


def test_many_concurrent_clients_get_their_own_answer(echo_server):
    def call(i: int) -> tuple[int, dict]:
        with httpx.Client(base_url=echo_server.url, timeout=20) as client:
            return i, client.post("/predict", json={"input": f"client-{i}"}).json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    assert all(body == {"output": f"client-{i}"} for i, body in results)


@pytest.mark.parametrize(
    "content, status, field",
    [
        (b"not json", 400, None),
        (b"[1, 2, 3]", 400, None),
        (b"[" * 2000 + b"]" * 2000, 400, None),  # deeply nested JSON is refused, not a crash
        (b'{"inputs": "typo"}', 422, "input"),
        (b'{"input": []}', 422, "input"),
    ],
)
def test_malformed_requests_get_4xx_json(echo_server, content, status, field):
    with httpx.Client(base_url=echo_server.url, timeout=10) as client:
        r = client.post("/predict", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        body = r.json()
        assert "error" in body
        if field:
            assert body["detail"]["field"] == field
        assert client.post("/predict", json={"input": "still serving"}).status_code == 200


def test_oversized_body_gets_413(echo_server):
    with httpx.Client(base_url=echo_server.url, timeout=10) as client:
        big = b'{"input": "' + b"x" * (4 * 1024 * 1024 + 10) + b'"}'
        r = client.post("/predict", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "max_body_bytes" in r.json()["error"]


def test_tiny_model_answers_and_checks_shapes(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=10) as client:
        r = client.post("/predict", json={"input": [0.1] * 8})
        assert r.status_code == 200, r.text
        outputs = r.json()["outputs"]
        assert len(outputs) == 1 and len(outputs[0]) == 4
        r = client.post("/predict", json={"input": [[0.1] * 8, [0.2] * 8, [0.3] * 8]})
        assert len(r.json()["outputs"]) == 3
        r = client.post("/predict", json={"input": [0.1] * 7})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "input[0]"
        r = client.post("/predict", json={"input": ["a"] * 8})
        assert r.status_code == 422


def test_tiny_answers_match_the_model_run_locally(tiny_server, tiny_dir):
    import torch

    from plugins.model.tiny import TinyModel

    model = TinyModel(TinyModel.Config(path=str(tiny_dir)))
    model.load("cpu")
    x = [[float(i) / 10 for i in range(8)]]
    expected = model.postprocess(model.forward(model.preprocess(x)))
    with httpx.Client(base_url=tiny_server.url, timeout=10) as client:
        got = client.post("/predict", json={"input": x}).json()["outputs"]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)


@pytest.fixture(scope="module", params=["fast", "litserve"])
def streaming_server(request, serve_module):
    return serve_module(["model=echo", "model.stream=true", f"server.transport={request.param}", "tracing=none",
                         "cache=none"])


def test_streamed_answer_arrives_as_ndjson_chunks(streaming_server):
    import json

    with httpx.Client(base_url=streaming_server.url, timeout=10) as client:
        with client.stream("POST", "/predict", json={"input": ["hey", 7]}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            chunks = [json.loads(line)["chunk"] for line in r.iter_lines() if line]
        assert chunks == ["h", "e", "y", 7]
        bad = client.post("/predict", json={"nope": 1})
        assert bad.status_code == 422  # errors before the stream starts keep their status

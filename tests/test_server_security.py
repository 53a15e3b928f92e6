"""Issue 15, items 3, 4 and 7: the API key on every non-public path, redaction in /info, JSON bodies
for Starlette's own errors (404, 405), large requests split (not 413), OTLP headers from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from framework import security

KEY = "s3cret-key"
OTLP_TOKEN = "Bearer otlp-token-abc"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keyed_server(serve_module):
    return serve_module(["model=echo", "cache=none", "tracing=none"], env={"HYDRASERVE_API_KEY": KEY})


@pytest.fixture(scope="module")
def otlp_server(serve_module):
    # tracing=otlp with nothing sampled: the headers are in the config (and /info) but no span leaves.
    return serve_module(["model=echo", "cache=none", "tracing=otlp", "tracing.sample_ratio=0.0",
                         "tracing.endpoint=http://127.0.0.1:9/v1/traces",
                         f"tracing.headers={{authorization: \"{OTLP_TOKEN}\", X-Scope-OrgID: team-a}}"],
                        env={"HYDRASERVE_API_KEY": KEY})


@pytest.fixture(scope="module")
def open_server(serve_module):
    return serve_module(["model=echo", "cache=none", "tracing=none", "batching=dynamic",
                         "batching.max_batch_size=2", "batching.max_delay_ms=0", "server.max_queue=4"])


# ----------------------------------------------------------------------------- item 3: the API key

GUARDED = [("GET", "/info"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"),
           ("GET", "/"), ("GET", "/no-such-path"), ("POST", "/predict"), ("GET", "/health/")]


@pytest.mark.parametrize("method, path", GUARDED)
def test_every_path_but_the_public_ones_needs_the_key(keyed_server, method, path):
    with httpx.Client(base_url=keyed_server.url, timeout=10) as client:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
            r = client.request(method, path, headers=headers, json={"input": "x"} if method == "POST" else None)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"] == "missing or invalid API key"
        assert client.get("/health").status_code == 200  # server.public_paths: [/health]


def test_the_key_opens_every_route_and_the_docs_are_gone(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=10, headers={"X-API-Key": KEY}) as client:
        assert client.post("/predict", json={"input": "x"}).json() == {"output": "x"}
        assert client.get("/info").status_code == 200
        assert b"hydraserve_requests" in client.get("/metrics").content
        for path in ("/docs", "/redoc", "/openapi.json"):  # disabled: they documented no route
            assert client.get(path).status_code == 404
    bearer = httpx.get(keyed_server.url + "/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert bearer.status_code == 200


def test_info_hides_the_otlp_token_and_shows_what_is_not_secret(otlp_server):
    r = httpx.get(otlp_server.url + "/info", headers={"X-API-Key": KEY}, timeout=10)
    assert OTLP_TOKEN not in r.text and "otlp-token" not in r.text and KEY not in r.text
    config = r.json()["config"]
    assert config["tracing"]["headers"] == {"authorization": "***", "X-Scope-OrgID": "***"}
    assert config["tracing"]["exporter"] == "otlp"
    assert config["server"]["api_key_env"] == "HYDRASERVE_API_KEY"  # names the variable, not the key
    assert config["server"]["public_paths"] == ["/health"]


def test_redact_nested_and_case_insensitive():
    data = {"Authorization": "Bearer x", "nested": [{"apiKey": "k", "ok": 1}, {"X-API-Key": ["a", "b"]}],
            "db": {"PASSWORD": "p", "user": "u", "access_token": None}, "headers": {"x-tenant": "t"},
            "url": "https://bob:hunter2@example.com/x", "api_key_env": "HYDRASERVE_API_KEY", "tokenizer": "bert",
            "max_tokens": 5, "client_secret": 3, "quality": {"token_agreement": 0.98, "min_token_agreement": 0.9}}
    assert security.redact(data) == {
        "Authorization": "***", "nested": [{"apiKey": "***", "ok": 1}, {"X-API-Key": ["***", "***"]}],
        "db": {"PASSWORD": "***", "user": "u", "access_token": None}, "headers": {"x-tenant": "***"},
        "url": "https://bob:***@example.com/x", "api_key_env": "HYDRASERVE_API_KEY", "tokenizer": "bert",
        "max_tokens": 5, "client_secret": "***", "quality": {"token_agreement": 0.98, "min_token_agreement": 0.9}}


def _tiny_app(**kwargs):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/a", hello), Route("/health", hello)])
    app.add_middleware(security.ApiKeyMiddleware, **kwargs)
    return app


def test_the_key_is_compared_in_constant_time(monkeypatch):
    from starlette.testclient import TestClient

    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    client = TestClient(_tiny_app(key="k3y", public_paths=("/health",)))
    assert client.get("/a", headers={"X-API-Key": "k3y"}).status_code == 200
    assert client.get("/a", headers={"X-API-Key": "nope"}).status_code == 401
    assert client.get("/health").status_code == 200
    assert calls == [(b"k3y", b"k3y"), (b"nope", b"k3y")]
    # No key configured: nothing is checked.
    assert TestClient(_tiny_app(key=None)).get("/a").status_code == 200


def test_public_paths_must_be_paths():
    from framework.config import compose, validate
    from framework.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(["model=echo", "server.public_paths=[/health,metrics]"]))
    assert [p.key for p in err.value.problems] == ["server.public_paths"]
    assert "metrics" in str(err.value)
    resolved = validate(compose(["model=echo", "server.public_paths=[/health,/metrics]"]))
    assert resolved.server.public_paths == ["/health", "/metrics"]


def test_public_paths_open_only_what_they_name(serve):
    server = serve(["model=echo", "cache=none", "tracing=none", "server.public_paths=[/health,/metrics]"],
                   env={"HYDRASERVE_API_KEY": KEY})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/info").status_code == 401
        assert client.post("/predict", json={"input": "x"}).status_code == 401


# ----------------------------------------------------------------------------- item 4: error bodies


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no-such-path", 404), ("GET", "/", 404), ("GET", "/docs", 404), ("GET", "/predict", 405),
    ("POST", "/health", 405), ("DELETE", "/info", 405), ("POST", "/metrics", 405),
])
def test_routing_errors_have_the_documented_body(open_server, method, path, status):
    r = httpx.request(method, open_server.url + path, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and path in body["error"], body
    if status == 405:
        assert "Allow" in r.headers and r.headers["Allow"] in body["detail"]


def test_validation_and_unexpected_errors_have_the_documented_body():
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    app = FastAPI(openapi_url=None)
    security.install_error_handlers(app)

    @app.get("/n/{number}")
    async def number(number: int):
        return {"n": number}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/n/seven")
    assert r.status_code == 422 and r.json()["error"] == "request is not valid"
    assert r.json()["detail"][0]["loc"] == ["path", "number"]
    r = client.get("/boom")
    assert r.status_code == 500 and r.json() == {"error": "internal server error", "detail": "see the server log"}


# ----------------------------------------------------------------------------- item 7: docs = behaviour


def test_a_request_over_max_batch_size_is_split_and_answered_in_order(open_server):
    items = [f"item-{i}" for i in range(7)]  # max_batch_size=2: chunks 2+2+2+1, four queue places
    r = httpx.post(open_server.url + "/predict", json={"input": items}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"output": items}


def test_a_request_of_more_chunks_than_the_queue_holds_is_413(open_server):
    r = httpx.post(open_server.url + "/predict", json={"input": list(range(9))}, timeout=10)  # 5 chunks > 4
    assert r.status_code == 413, r.text
    body = r.json()
    assert "server.max_queue=4" in body["error"] and body["detail"] == {"field": "input"}
    assert httpx.post(open_server.url + "/predict", json={"input": [1, 2]}, timeout=10).status_code == 200


def test_readme_no_longer_promises_413_for_more_than_max_batch_size():
    readme = (ROOT / "README.md").read_text()
    assert "more gets a 413" not in readme and "is refused with 413" not in readme


def test_otlp_headers_from_the_command_line_as_the_readme_shows(tmp_path):
    cmd = [sys.executable, "-m", "framework.cli", "validate", "model=echo", "tracing=otlp",
           'tracing.headers={authorization: "Bearer abc"}']
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not in struct" not in done.stderr
    assert "well-formed" in done.stdout

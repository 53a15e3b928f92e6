"""Overload and deadlines: 503 + Retry-After beyond the queue bound, 504 past a deadline, nothing hangs."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def slow_server(serve_module, tiny_dir):
    # One slow worker (200 ms a forward pass) behind a queue of at most 2 admitted requests.
    return serve_module(["model=tiny", f"model.path={tiny_dir}", "model.delay_ms=200", "batching=none",
                         "cache=none", "tracing=none", "server.max_queue=2", "server.retry_after_s=2"])


def _post(url: str, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/predict", json={"input": [0.5] * 8}, headers=headers)


def _batches_run(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "hydraserve_batch_size":
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return 0.0


def test_burst_beyond_queue_gets_503_with_retry_after(slow_server):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(slow_server.url), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert set(codes) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "2"
    assert "max_queue" in rejected.json()["detail"]
    assert _post(slow_server.url).status_code == 200  # serves normally afterwards


def test_deadline_gives_504_and_expired_work_is_not_computed(slow_server):
    before = _batches_run(slow_server.url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, slow_server.url)  # occupies the worker for 200 ms
        time.sleep(0.05)
        second = pool.submit(_post, slow_server.url, {"X-Request-Timeout-Ms": "50"})
        assert second.result().status_code == 504
        assert "deadline" in second.result().json()["error"]
        assert first.result().status_code == 200
    time.sleep(0.5)
    assert _batches_run(slow_server.url) - before == 1  # the expired request never ran
    assert _post(slow_server.url).status_code == 200


def test_bad_timeout_header_is_400(slow_server):
    r = _post(slow_server.url, {"X-Request-Timeout-Ms": "soon"})
    assert r.status_code == 400 and r.json()["detail"]["field"] == "X-Request-Timeout-Ms"


def test_api_key_required_when_set(serve):
    server = serve(["model=echo", "cache=none", "tracing=none"], env={"HYDRASERVE_API_KEY": "s3cret"})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/predict", json={"input": "x"}).status_code == 401
        assert client.post("/predict", json={"input": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/predict", json={"input": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        ok = client.post("/predict", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200

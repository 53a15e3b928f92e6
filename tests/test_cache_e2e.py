"""Response caching over HTTP: X-Cache, no-cache bypass, shared by API processes, persistent, never stale."""

from __future__ import annotations

import time

import httpx
import pytest

VECTOR = {"input": [0.3] * 8}


def _post(url: str, body: dict = VECTOR, headers: dict | None = None) -> httpx.Response:
    # A fresh connection each time, so with several API processes any of them may answer.
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/predict", json=body, headers=headers)


def _until_hit(url: str, body: dict = VECTOR, tries: int = 20) -> httpx.Response:
    # The store runs after the miss's answer is sent; give it a moment.
    for _ in range(tries):
        r = _post(url, body)
        if r.headers.get("x-cache") == "hit":
            return r
        time.sleep(0.05)
    return r


def test_miss_then_hit_and_no_cache_bypass(serve, tiny_dir):
    server = serve(["model=tiny", f"model.path={tiny_dir}", "cache=disk", "tracing=none"])
    first = _post(server.url)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    hit = _until_hit(server.url)
    assert hit.headers["x-cache"] == "hit" and hit.json() == first.json()
    bypass = _post(server.url, headers={"Cache-Control": "no-cache"})
    assert bypass.headers["x-cache"] == "bypass" and bypass.status_code == 200
    # Whatever the cache answers is what the model answers: a list holding the same vector.
    listed = _post(server.url, {"input": [[0.3] * 8]})
    assert listed.json() == _post(server.url, {"input": [[0.3] * 8]}, {"Cache-Control": "no-cache"}).json()


def test_persistent_across_restart_and_never_stale(tmp_path, tiny_dir):
    from conftest import ServerPool

    from plugins.model.tiny import TinyModel

    other = TinyModel.build(tmp_path / "other-weights", seed=7)
    pool = ServerPool(tmp_path)
    try:
        server = pool([f"model.path={tiny_dir}", "model=tiny", "cache=disk", "tracing=none"])
        assert _post(server.url).headers["x-cache"] == "miss"
        answer = _until_hit(server.url).json()
        server.stop()

        server = pool(["model=tiny", f"model.path={tiny_dir}", "cache=disk", "tracing=none"])
        r = _post(server.url)
        assert r.headers["x-cache"] == "hit" and r.json() == answer  # survived the restart
        server.stop()

        server = pool(["model=tiny", f"model.path={other}", "cache=disk", "tracing=none"])
        r = _post(server.url)
        assert r.headers["x-cache"] == "miss" and r.json() != answer  # other weights: never stale
        server.stop()

        server = pool(["model=tiny", f"model.path={tiny_dir}", "cache=disk", "tracing=none",
                       "quantization=int8_weight_only", "hardware.compile=off", "quantization.allow_slow=true",
                       "quantization.min_quality=0.9"])
        assert _post(server.url).headers["x-cache"] == "miss"  # other quantization: its own entries
    finally:
        pool.stop_all()


@pytest.mark.parametrize("cache, shared", [("disk", True)])
def test_hits_shared_across_api_processes(serve, tiny_dir, cache, shared):
    server = serve(["model=tiny", f"model.path={tiny_dir}", f"cache={cache}", "tracing=none",
                    "server.num_api_servers=2"])
    assert _post(server.url).headers["x-cache"] == "miss"
    time.sleep(0.3)
    verdicts = [_post(server.url).headers["x-cache"] for _ in range(12)]
    assert verdicts == ["hit"] * 12  # whichever API process answers, the disk cache is shared

"""A killed worker: its in-flight requests fail at once with a clear error, and the server recovers."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import httpx
import pytest


@pytest.mark.parametrize("transport", ["fast"])
def test_killed_worker_fails_inflight_and_recovers(serve, tiny_dir, transport):
    server = serve(["model=tiny", f"model.path={tiny_dir}", "model.delay_ms=2000", "cache=none",
                    "tracing=none", "server.restart_workers=true", f"server.transport={transport}"])
    with httpx.Client(base_url=server.url, timeout=60) as client:
        pid = client.get("/info").json()["engine"][0]["pid"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(client.post, "/predict", json={"input": [1.0] * 8})
            time.sleep(0.5)
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            r = inflight.result()
        assert r.status_code == 503
        assert "worker" in r.json()["error"] and "died" in r.json()["error"]
        assert time.monotonic() - started < 5  # failed promptly, not at the 30 s deadline
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if client.get("/health").status_code == 200:
                r = client.post("/predict", json={"input": [1.0] * 8}, headers={"X-Request-Timeout-Ms": "20000"})
                if r.status_code == 200:
                    break
            time.sleep(0.5)
        assert r.status_code == 200, r.text

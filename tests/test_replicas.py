"""Two hydraserve replicas sharing one redis-server, behind a real nginx (tests/services.py).

* an answer computed by one replica is an X-Cache hit on the other, directly and through nginx;
* ``kill -9`` of one replica while a load goes through nginx: every request gets an answer (200 from
  the other replica, or a counted error) within its timeout; the counts are printed (``-s``).

The kill test runs last in this module: it takes one of the module's replicas down for good.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import pytest
from services import start_nginx, start_redis, stop

TIMEOUT_S = 10.0  # per request: none may take longer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, serve_module):
    folder = tmp_path_factory.mktemp("replicas")
    redis_url, redis_proc = start_redis(folder)
    common = ["model=echo", "cache=redis", f"cache.url={redis_url}", "tracing=none"]
    replicas: list = [None, None]
    failures: list[BaseException] = []

    def start(i: int) -> None:
        try:
            replicas[i] = serve_module(common)
        except BaseException as exc:  # noqa: BLE001 - raised below, after the other one started
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]  # both start at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nginx_proc = None
    try:
        if failures:
            raise failures[0]
        nginx_url, nginx_proc = start_nginx(folder, [f"127.0.0.1:{r.port}" for r in replicas])
        yield {"nginx": nginx_url, "replicas": replicas, "redis": redis_url}
    finally:
        stop(nginx_proc)
        stop(redis_proc)


def _post(url: str, body: dict, timeout: float = TIMEOUT_S) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=timeout) as client:
        return client.post("/predict", json=body)


def _hits(url: str) -> float:
    scrape = httpx.get(url + "/metrics", timeout=5).text
    line = next(x for x in scrape.splitlines() if x.startswith('hydraserve_cache_lookups_total{result="hit"}'))
    return float(line.rsplit(" ", 1)[1])


def _until_hit(url: str, body: dict, tries: int = 40) -> httpx.Response:
    for _ in range(tries):  # the store runs after the miss's answer is sent
        r = _post(url, body)
        if r.headers.get("x-cache") == "hit":
            return r
        time.sleep(0.05)
    return r


def test_an_answer_computed_by_one_replica_is_a_hit_on_the_other(cluster):
    a, b = cluster["replicas"]
    body = {"input": "computed on replica a"}
    first = _post(a.url, body)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    on_b = _until_hit(b.url, body)
    assert on_b.headers["x-cache"] == "hit" and on_b.content == first.content

    # Through nginx (round robin over both): one miss, then hits answered by both replicas.
    before = _hits(a.url), _hits(b.url)
    body = {"input": "through nginx"}
    assert _post(cluster["nginx"], body).headers["x-cache"] == "miss"
    time.sleep(0.2)
    answers = [_post(cluster["nginx"], body) for _ in range(8)]
    assert all(r.status_code == 200 and r.headers["x-cache"] == "hit" for r in answers)
    after = _hits(a.url), _hits(b.url)
    assert after[0] > before[0] and after[1] > before[1], (before, after)  # both replicas hit
    assert sum(after) - sum(before) == 8


def test_kill_9_of_one_replica_under_load_every_request_answers(cluster):
    _, b = cluster["replicas"]
    n, killed_after = 240, 60
    results: list[tuple[str, float]] = [("", 0.0)] * n
    started = threading.Semaphore(0)

    def one(i: int) -> None:
        started.release()
        t0 = time.perf_counter()
        try:
            # Half repeated inputs (cache hits on either replica), half new ones (the model runs).
            r = _post(cluster["nginx"], {"input": f"load {i % 2 and i}"})
            outcome = str(r.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        results[i] = (outcome, time.perf_counter() - t0)

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        for _ in range(killed_after):
            started.acquire()
        os.killpg(b.proc.pid, signal.SIGKILL)  # kill -9 of the whole replica: its API processes and workers
        done, not_done = wait(futures, timeout=TIMEOUT_S * n / 8 + 30)
    elapsed = time.perf_counter() - t_start
    assert not not_done, f"{len(not_done)} requests never finished"
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    errors = n - outcomes.get("200", 0)
    slowest = max(dt for _, dt in results)
    print(f"\nreplica kill under load: {n} requests through nginx, 8 at a time, replica b killed (SIGKILL) "
          f"after {killed_after} had started: outcomes {outcomes}, errors {errors}, slowest {slowest:.2f} s, "
          f"total {elapsed:.1f} s")
    assert slowest <= TIMEOUT_S + 1, "a request hung past its timeout"
    assert errors <= 8, outcomes  # at most the requests in flight at the kill (nginx retries the rest)
    # After the kill, the surviving replica answers everything.
    tail = [_post(cluster["nginx"], {"input": f"after the kill {i}"}) for i in range(10)]
    assert all(r.status_code == 200 for r in tail)

"""cache=redis against a real redis-server (tests/services.py starts one per module on a free port).

Unit level: hit/miss, raw bytes, TTL, prefix isolation, clear() removing only its prefix, password
redaction; a Redis that dies or hangs mid-way: misses, counted, no exception, each call bounded.
Server level: a real hydraserve (model=echo cache=redis) answering X-Cache miss then hit, /info
without the Redis password, and still answering 200 once Redis is gone.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest
from services import start_redis, stop

from framework import CacheRequest, metrics
from framework.cache_admin import cache_clear, cache_stats
from framework.cache_key import cache_key, cache_scope
from framework.config import compose, validate
from framework.security import redact
from plugins.cache.redis import RedisCache, RedisCacheConfig, redact_url

SCOPE = cache_scope({"model": "m", "weights": "w1"}, {"name": "none"}, {"max_length": 256})
SECRET = "s3cr3t-pw"


def req(key: str) -> CacheRequest:
    return CacheRequest(key=key, texts=None, scope=SCOPE)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    url, proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc)


def make(url: str, **kw) -> RedisCache:
    cache = RedisCache(RedisCacheConfig(url=url, **kw))
    cache.open()
    return cache


def errors(op: str = "get") -> float:
    child = metrics._metrics().cache_error_children.get(("redis", op))
    return child._value.get() if child is not None else 0.0


def test_miss_put_hit_raw_bytes(redis_url):
    cache = make(redis_url, prefix="t-bytes:")
    key = cache_key(SCOPE, ["hello"])
    assert cache.get(req(key)) is None
    value = bytes(range(256)) + b'{"output": "\xff\x00"}'  # not UTF-8, NUL bytes: stored as is
    cache.put(req(key), value)
    hit = cache.get(req(key))
    assert hit is not None and hit.value == value and hit.kind == "hit"
    raw = cache._client.get("t-bytes:" + key)  # the stored value is the body itself, never a pickle
    assert raw == value
    assert cache._client.pttl("t-bytes:" + key) > 0  # the default ttl_s (1 day) is set
    assert cache.counts["hits"] == 1 and cache.counts["misses"] == 1 and cache.counts["stores"] == 1
    cache.close()


def test_ttl_expires(redis_url):
    cache = make(redis_url, prefix="t-ttl:", ttl_s=0.3)
    cache.put(req("k"), b"v")
    assert cache.get(req("k")).value == b"v"
    assert 0 < cache._client.pttl("t-ttl:k") <= 300
    time.sleep(0.45)
    assert cache.get(req("k")) is None
    forever = make(redis_url, prefix="t-ttl-none:", ttl_s=None)
    forever.put(req("k"), b"v")
    assert forever._client.pttl("t-ttl-none:k") == -1  # no expiry: Redis's maxmemory policy evicts it


def test_prefix_isolation_and_clear_removes_only_its_keys(redis_url):
    a = make(redis_url, prefix="iso-a:")
    b = make(redis_url, prefix="iso-b:")
    glob = make(redis_url, prefix="iso-*:")  # glob characters in a prefix are escaped in SCAN MATCH
    a.put(req("same"), b"from a")
    assert b.get(req("same")) is None and glob.get(req("same")) is None
    b.put(req("same"), b"from b")
    assert a.get(req("same")).value == b"from a" and b.get(req("same")).value == b"from b"
    for i in range(1200):  # more than one SCAN batch and one UNLINK batch
        a.put(req(f"k{i}"), b"x")
    a._client.set("someone-else:data", b"keep me")  # another application's key in the same database
    assert glob.clear() == 0
    assert a.stats()["entries"] == 1201
    assert a.clear() == 1201
    assert a.get(req("same")) is None and a.stats()["entries"] == 0
    assert b.get(req("same")).value == b"from b"
    assert a._client.get("someone-else:data") == b"keep me"
    assert b.clear() == 1


def test_two_configs_never_share_an_answer(redis_url):
    cache = make(redis_url, prefix="scope:")
    other_scope = cache_scope({"model": "m", "weights": "w2"}, {"name": "none"}, {"max_length": 256})
    cache.put(req(cache_key(SCOPE, ["q"])), b"answer of w1")
    assert cache.get(req(cache_key(other_scope, ["q"]))) is None
    cache.clear()


def test_admin_stats_and_clear(redis_url):
    cache = make(redis_url, prefix="admin:")
    cache.put(req("k"), b"v")
    admin = RedisCache(RedisCacheConfig(url=redis_url, prefix="admin:"))
    stats = cache_stats(admin)
    assert stats["enabled"] and stats["plugin"] == "redis" and stats["entries"] == 1
    assert stats["maxmemory_policy"] == "allkeys-lru" and "note" not in stats  # shared: no per-process note
    assert cache_clear(RedisCache(RedisCacheConfig(url=redis_url, prefix="admin:"))) == 1


def test_password_is_redacted_everywhere(tmp_path, caplog):
    url, proc = start_redis(tmp_path, password=SECRET)
    try:
        assert SECRET in url
        resolved = validate(compose(["model=echo", "cache=redis", f"cache.url={url}"]))
        cache = resolved.cache
        assert SECRET not in str(cache.describe()) and "***" in cache.describe()["url"]
        assert SECRET not in str(redact(resolved.raw))  # what /info shows
        cache.open()
        cache.put(req("k"), b"v")  # the password in the URL authenticates
        assert cache.get(req("k")).value == b"v"
        assert SECRET not in str(cache.stats())
        cache.close()
        # A wrong password: misses, and the log line names the URL without the password.
        wrong = url.replace(SECRET, "wrong-" + SECRET)
        with caplog.at_level(logging.WARNING, logger="hydraserve.cache.redis"):
            bad = make(wrong)
            assert bad.get(req("k")) is None
        assert caplog.records and all(SECRET not in r.getMessage() for r in caplog.records)
    finally:
        stop(proc)
    for url in (f"redis://user:{SECRET}@h:1/0", f"redis://:{SECRET}@h/0", f"rediss://h:1/0?password={SECRET}"):
        assert SECRET not in redact_url(url) and "***" in redact_url(url), url
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_password_from_environment(tmp_path, monkeypatch):
    url, proc = start_redis(tmp_path, password=SECRET)
    try:
        monkeypatch.setenv("TEST_REDIS_PW", SECRET)
        plain = url.replace(f":{SECRET}@", "")
        cache = make(plain, password_env="TEST_REDIS_PW")
        cache.put(req("k"), b"v")
        assert cache.get(req("k")).value == b"v"
        monkeypatch.delenv("TEST_REDIS_PW")
        assert "TEST_REDIS_PW is not set" in RedisCache(RedisCacheConfig(url=plain, password_env="TEST_REDIS_PW")
                                                        ).check(None)[0]
    finally:
        stop(proc)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def test_redis_killed_mid_way_degrades_to_counted_misses_then_recovers(tmp_path, caplog):
    url, proc = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # No front: every lookup goes to Redis (test_front_serves_known_answers_while_redis_is_down has one).
    cache = make(url, backoff_initial_s=0.2, backoff_max_s=0.4, log_interval_s=60, front_entries=0)
    cache.put(req("k"), b"v")
    assert cache.get(req("k")).value == b"v"
    before_get, before_put = errors("get"), errors("put")
    proc.kill()  # SIGKILL: the open connection dies with it
    proc.wait(5)
    with caplog.at_level(logging.WARNING, logger="hydraserve.cache.redis"):
        worst = 0.0
        for _ in range(50):
            hit, dt = _timed(cache.get, req("k"))
            assert hit is None
            worst = max(worst, dt)
            _, dt = _timed(cache.put, req("k2"), b"v2")  # no exception either
            worst = max(worst, dt)
        assert worst < 0.25, f"a call took {worst:.3f} s with Redis down"
        assert errors("get") - before_get == 50 and errors("put") - before_put == 50
        assert cache.counts["errors"] >= 1 and cache.counts["skipped"] >= 90  # back-off: Redis mostly skipped
        # Still down after the back-off: tried again (one more failure), still a miss.
        time.sleep(0.25)
        assert cache.get(req("k")) is None
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, "a failing Redis is logged once per log_interval_s"
    # Redis comes back on the same port (empty: nothing was saved): after the back-off, hits again.
    url2, proc2 = start_redis(tmp_path, port=port)
    try:
        time.sleep(0.45)
        assert cache.get(req("k")) is None  # a real miss: answered by Redis
        cache.put(req("k"), b"again")
        assert cache.get(req("k")).value == b"again"
        assert cache._failures == 0
    finally:
        stop(proc2)


def test_front_serves_known_answers_while_redis_is_down(tmp_path):
    url, proc = start_redis(tmp_path)
    cache = make(url, backoff_initial_s=0.2, front_ttl_s=0.5)
    cache.put(req("known"), b"answer")
    other = make(url)  # another process (or replica): its front is empty, so it reads Redis
    assert other.get(req("known")).value == b"answer"
    stop(proc, timeout=2)
    hit, dt = _timed(cache.peek, req("known"))  # the front answers without touching Redis
    assert hit.value == b"answer" and dt < 0.05
    assert cache.get(req("known")).value == b"answer"
    assert cache.get(req("unknown")) is None  # everything else is a (counted) miss
    time.sleep(0.6)
    assert cache.peek(req("known")) is None  # front_ttl_s: a copy does not outlive it


def test_a_hanging_redis_costs_one_socket_timeout():
    # A listener that accepts and never answers: every read times out (socket_timeout_ms).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    threading.Thread(target=lambda: accepted.extend(listener.accept() for _ in range(4)), daemon=True).start()
    try:
        cache = make(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", socket_timeout_ms=50,
                     backoff_initial_s=0.1, backoff_max_s=0.1)
        hit, dt = _timed(cache.get, req("k"))
        assert hit is None and dt < 0.5, dt
        _, skipped = _timed(cache.get, req("k"))
        assert skipped < 0.01  # in back-off: no network at all
        time.sleep(0.15)
        _, dt = _timed(cache.put, req("k"), b"v")
        assert dt < 0.5
        assert cache.counts["errors"] == 2 and cache.counts["skipped"] == 1
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()


def test_unreachable_at_start_is_not_a_refusal():
    # Nothing listens on this port: check() and validate pass (Redis may come up later), lookups miss.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resolved = validate(compose(["model=echo", "cache=redis", f"cache.url=redis://127.0.0.1:{port}/0"]))
    cache = resolved.cache
    assert cache.check(None) == [] and cache.lookup_may_block is True
    cache.open()
    assert cache.get(req("k")) is None
    assert "error" in cache.stats()
    with pytest.raises(Exception):  # noqa: B017 - clearing is an admin command: it says it failed
        cache.clear()


def test_bad_config_is_refused():
    from framework.config import ConfigError

    with pytest.raises(ConfigError) as info:
        validate(compose(["model=echo", "cache=redis", "cache.url=http://x", "cache.prefix=",
                          "cache.socket_timeout_ms=0"]))
    text = str(info.value)
    assert "cache.url" in text and "cache.prefix" in text and "cache.socket_timeout_ms" in text


def test_pickled_plugin_ships_only_its_config(redis_url):
    import pickle

    cache = make(redis_url, prefix="pickle:")
    cache.put(req("k"), b"v")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._client is None and clone.config == cache.config
    assert clone.get(req("k")).value == b"v"  # opens its own connection on first use
    cache.clear()


# ------------------------------------------------------------------------------------- server
def _post(url: str, body: dict) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=10) as client:
        return client.post("/predict", json=body)


def test_server_miss_then_hit_and_survives_redis_going_away(serve, tmp_path):
    url, proc = start_redis(tmp_path, password=SECRET)
    try:
        # No front, so the lookups after Redis goes away reach it (and miss) in whichever API process.
        server = serve(["model=echo", "cache=redis", f"cache.url={url}", "cache.front_entries=0", "tracing=none"])
        body = {"input": "hello redis"}
        first = _post(server.url, body)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        for _ in range(40):  # the store runs after the miss's answer is sent
            second = _post(server.url, body)
            if second.headers.get("x-cache") == "hit":
                break
            time.sleep(0.05)
        assert second.headers["x-cache"] == "hit" and second.content == first.content
        info = httpx.get(server.url + "/info", timeout=10).text
        assert SECRET not in info and "redis://:***@127.0.0.1" in info
        scrape = httpx.get(server.url + "/metrics", timeout=10).text
        assert 'hydraserve_cache_errors_total{backend="redis",op="get"} 0.0' in scrape
        stop(proc, timeout=2)
        t0 = time.perf_counter()
        answers = [_post(server.url, {"input": f"after {i}"}) for i in range(10)]
        elapsed = time.perf_counter() - t0
        assert all(r.status_code == 200 and r.headers["x-cache"] == "miss" for r in answers)
        assert _post(server.url, body).headers["x-cache"] == "miss"  # Redis gone: a miss, the model answers
        assert elapsed < 5, elapsed
        scrape = httpx.get(server.url + "/metrics", timeout=10).text
        line = next(x for x in scrape.splitlines()
                    if x.startswith('hydraserve_cache_errors_total{backend="redis",op="get"}'))
        assert float(line.rsplit(" ", 1)[1]) >= 11
        assert SECRET not in server.log_tail(200)
    finally:
        stop(proc)

"""``cache=redis``: the exact response cache on a Redis server, shared by every API process and replica.

One Redis behind several hydraserve replicas gives them one cache: an answer computed by one replica is
a hit on every other. Entries are the response bodies as raw bytes (never pickled) under
``prefix`` + the request's key; the key already digests the config scope (model identity and
weights fingerprint, quantization, preprocessing, route: ``framework/cache_key.py``), so two configs
sharing one Redis never share an answer.

Size policy: this plugin sets a TTL on every entry (``ttl_s``) and nothing else; how much memory the
cache may take is Redis's own setting. Give the Redis a ``maxmemory`` and ``maxmemory-policy
allkeys-lru`` (or ``volatile-lru`` when it holds other data that must never be evicted): Redis then
evicts the least recently used answers itself. Without ``maxmemory`` only the TTL bounds it.

A Redis that is down or slow degrades to misses, never to an error: every call has a socket timeout
(``socket_timeout_ms``, ``connect_timeout_ms``) and no retries, so a lookup costs at most about that
long; after a failure Redis is skipped for a short, growing interval (``backoff_initial_s`` doubling
up to ``backoff_max_s``), during which lookups miss at once and stores are dropped. Each failed or
skipped call is counted in ``hydraserve_cache_errors_total{backend="redis",op="get"|"put"}``; the
failure is logged once, then at most every ``log_interval_s``, and the recovery once.

A password belongs in the environment (``password_env``), not in ``url``; one in the URL works but is
redacted wherever this plugin shows or logs the URL (``/info`` redacts it too).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from framework import CacheHit, CachePlugin, CacheRequest, CheckContext
from plugins.cache._lru import MemoryStore

log = logging.getLogger("hydraserve.cache.redis")

SCHEMES = ("redis", "rediss", "unix")
_GLOB_SPECIALS = "\\*?[]"


def redact_url(url: str) -> str:
    """``url`` with its password (``scheme://user:password@host``, ``?password=...``) shown as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        if sep:
            netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = [(k, "***" if k.lower() in ("password", "passwd") else v) for k, v in parse_qsl(query, True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass
class RedisCacheConfig:
    url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss:// (TLS) or unix:// ; the /N path is the database
    password_env: str | None = None  # name of an environment variable holding the password (keeps it out of configs)
    prefix: str = "hydraserve:"  # every key is this + the request's key; clear() removes only these
    # (named "prefix", not "key_prefix": /info hides the value of every key whose name has "key" in it)
    ttl_s: float | None = 86400.0  # seconds an entry lives in Redis; None = until Redis evicts it (maxmemory)
    socket_timeout_ms: float = 50.0  # a read or write slower than this is a miss, not a wait
    connect_timeout_ms: float = 50.0  # connecting slower than this is a miss too
    max_value_bytes: int = 16 * 1024 * 1024  # answers larger than this are not stored
    backoff_initial_s: float = 0.5  # after a failure, skip Redis this long; doubled per failure in a row...
    backoff_max_s: float = 30.0  # ...up to this
    log_interval_s: float = 60.0  # a failing Redis is logged once, then at most this often
    lookup_in_thread: bool = True  # True: get/put run in a thread (a network round trip); False: on the event loop
    # A small per-process LRU in front of Redis: a repeated hit costs a dict lookup on the event loop
    # instead of a thread hop and a round trip. Keys are content-addressed (config + input), so a front
    # copy is the answer Redis holds; it lives front_ttl_s at most, so another replica's `cache clear`
    # (or Redis's TTL) is seen here within that time.
    front_entries: int = 1024  # 0 disables the front
    front_bytes: int = 64 * 1024 * 1024
    front_ttl_s: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        if scheme not in SCHEMES:
            out.append(("url", f"must start with redis://, rediss:// or unix://, got '{redact_url(self.url)}'"))
        if not self.prefix:
            out.append(("prefix", "must not be empty: clear() removes every key that starts with it"))
        if self.ttl_s is not None and self.ttl_s < 0.001:
            out.append(("ttl_s", f"must be >= 0.001 seconds or null (until evicted), got {self.ttl_s}"))
        for name in ("socket_timeout_ms", "connect_timeout_ms", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.max_value_bytes <= 0:
            out.append(("max_value_bytes", f"must be > 0, got {self.max_value_bytes}"))
        if self.log_interval_s < 0:
            out.append(("log_interval_s", f"must be >= 0, got {self.log_interval_s}"))
        if self.front_entries < 0 or self.front_bytes < 0:
            out.append(("front_entries", "front_entries and front_bytes must be >= 0 (0 disables the front)"))
        if self.front_ttl_s <= 0:
            out.append(("front_ttl_s", f"must be > 0 seconds, got {self.front_ttl_s}"))
        return out


class RedisCache(CachePlugin):
    Config = RedisCacheConfig

    _client: Any = None
    _open_lock = threading.Lock()

    def __init__(self, config: Any | None = None):
        super().__init__(config)
        self._reset_state()

    def _reset_state(self) -> None:
        self._client = None
        c = self.config
        # A front copy never outlives the Redis entry it copies (ttl_s) nor front_ttl_s.
        front_ttl = c.front_ttl_s if c.ttl_s is None else min(c.front_ttl_s, c.ttl_s)
        self._front = (MemoryStore(c.front_entries, c.front_bytes, front_ttl)
                       if c.front_entries > 0 and c.front_bytes > 0 else None)
        self._state_lock = threading.Lock()
        self._failures = 0  # failures in a row
        self._skip_until = 0.0  # monotonic time before which Redis is not called
        self._last_log = float("-inf")
        self._unlogged = 0  # failures since the last log line
        self.counts = {"hits": 0, "misses": 0, "errors": 0, "skipped": 0, "stores": 0}

    @property
    def lookup_may_block(self) -> bool:  # type: ignore[override]
        return bool(self.config.lookup_in_thread)

    def check(self, ctx: CheckContext) -> list[str]:
        # No connection here: a Redis that is down at start-up is a cache that misses, not a refusal.
        env = self.config.password_env
        if env and env not in os.environ:
            return [f"password_env: the environment variable {env} is not set"]
        return []

    def describe(self) -> dict:
        out = super().describe()
        out["url"] = redact_url(self.config.url)
        return out

    # --- connection -------------------------------------------------------------------------
    def open(self) -> None:
        with self._open_lock:
            if self._client is not None:
                return
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            c = self.config
            kwargs: dict[str, Any] = {
                "socket_timeout": c.socket_timeout_ms / 1000,
                "socket_connect_timeout": c.connect_timeout_ms / 1000,
                # No retries inside redis-py: a failure is a miss now, and the back-off here decides
                # when Redis is tried again.
                "retry": Retry(NoBackoff(), 0),
                "retry_on_timeout": False,
                "health_check_interval": 0,
                "decode_responses": False,
            }
            if c.password_env:
                kwargs["password"] = os.environ.get(c.password_env)
            self._client = redis.Redis.from_url(c.url, **kwargs)
        from framework import metrics

        for op in ("get", "put"):
            metrics.cache_error("redis", op, 0)  # exported at zero from the start

    def open_store(self) -> None:
        self.open()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
                client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001 - closing a dead connection must not fail a shutdown
                pass

    def _opened(self):
        if self._client is None:
            self.open()
        return self._client

    def _key(self, request: CacheRequest) -> str:
        return self.config.prefix + request.key

    # --- degradation ------------------------------------------------------------------------
    def _skipping(self) -> bool:
        return self._skip_until > 0.0 and time.monotonic() < self._skip_until

    def _failed(self, op: str, exc: BaseException) -> None:
        from framework import metrics

        metrics.cache_error("redis", op)
        now = time.monotonic()
        c = self.config
        with self._state_lock:
            self.counts["errors"] += 1
            self._failures += 1
            delay = min(c.backoff_max_s, c.backoff_initial_s * 2 ** min(self._failures - 1, 30))
            self._skip_until = now + delay
            self._unlogged += 1
            due = now - self._last_log >= c.log_interval_s
            if due:
                self._last_log = now
                failed, self._unlogged = self._unlogged, 0
        if due:
            log.warning("redis cache at %s failed (%s: %s): answering misses, retrying in %.1f s "
                        "(%d failure(s) since the last report; counted in "
                        "hydraserve_cache_errors_total{backend=\"redis\"})",
                        redact_url(c.url), type(exc).__name__, exc, delay, failed)

    def _succeeded(self) -> None:
        if self._failures:
            with self._state_lock:
                failures, self._failures, self._skip_until = self._failures, 0, 0.0
            if failures:
                log.warning("redis cache at %s answers again after %d failure(s) in a row",
                            redact_url(self.config.url), failures)

    def _skipped(self, op: str) -> None:
        from framework import metrics

        metrics.cache_error("redis", op)
        self.counts["skipped"] += 1

    # --- the contract -----------------------------------------------------------------------
    def peek(self, request: CacheRequest) -> CacheHit | None:
        front = self._front
        value = front.get(request.key) if front is not None else None
        if value is None:
            return None
        self.counts["hits"] += 1
        return CacheHit(value)

    def get(self, request: CacheRequest) -> CacheHit | None:
        hit = self.peek(request)
        if hit is not None:
            return hit
        if self._skipping():
            self._skipped("get")
            return None
        try:
            value = self._opened().get(self._key(request))
        except Exception as exc:  # noqa: BLE001 - any Redis failure is a miss, never a 500
            self._failed("get", exc)
            return None
        self._succeeded()
        if value is None:
            self.counts["misses"] += 1
            return None
        self.counts["hits"] += 1
        value = bytes(value)
        if self._front is not None:
            self._front.put(request.key, value)
        return CacheHit(value)

    def put(self, request: CacheRequest, value: bytes) -> None:
        if len(value) > self.config.max_value_bytes:
            return
        if self._front is not None:
            self._front.put(request.key, bytes(value))
        if self._skipping():
            self._skipped("put")
            return
        ttl = self.config.ttl_s
        try:
            self._opened().set(self._key(request), bytes(value),
                               px=max(1, round(ttl * 1000)) if ttl is not None else None)
        except Exception as exc:  # noqa: BLE001 - a store that fails only loses this entry
            self._failed("put", exc)
            return
        self._succeeded()
        self.counts["stores"] += 1

    def _pattern(self) -> str:
        prefix = "".join("\\" + ch if ch in _GLOB_SPECIALS else ch for ch in self.config.prefix)
        return prefix + "*"

    def _scan(self):
        return self._opened().scan_iter(match=self._pattern(), count=1000)

    def stats(self) -> dict:
        """Entries under this prefix (a SCAN: admin use), the server's memory policy, this process's counts."""
        client = self._opened()
        out: dict[str, Any] = {"plugin": "redis", "url": redact_url(self.config.url),
                               "prefix": self.config.prefix, "ttl_s": self.config.ttl_s}
        try:
            out["entries"] = sum(1 for _ in self._scan())
            memory = client.info("memory")
            out["used_memory_bytes"] = memory.get("used_memory")
            out["maxmemory_bytes"] = memory.get("maxmemory")
            out["maxmemory_policy"] = memory.get("maxmemory_policy")
        except Exception as exc:  # noqa: BLE001 - a Redis that is down is reported, not raised
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["this_process"] = dict(self.counts)
        return out

    def clear(self) -> int:
        """UNLINK every key under ``prefix`` (SCAN in batches; never FLUSHDB): other data stays."""
        client = self._opened()
        removed = 0
        batch: list[bytes] = []
        for key in self._scan():
            batch.append(key)
            if len(batch) >= 500:
                removed += client.unlink(*batch)
                batch = []
        if batch:
            removed += client.unlink(*batch)
        if self._front is not None:
            self._front.clear()
        return int(removed)

    def __getstate__(self) -> dict:
        # The composed API may be pickled (spawn): ship the config, never a socket or a lock.
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self._reset_state()


PLUGIN = RedisCache

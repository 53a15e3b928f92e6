"""``cache=memory``: an LRU of response bodies inside each API process.

The fastest hit (a dict lookup), but each API process holds its own copy (with
``server.num_api_servers=2`` a request may miss in one process what the other has) and nothing
survives a restart. For a cache shared by every process and kept across restarts use ``cache=disk``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from framework import CacheHit, CachePlugin, CacheRequest
from plugins.cache._lru import MemoryStore


@dataclass
class MemoryCacheConfig:
    max_entries: int = 10_000  # least recently used responses are evicted beyond this many
    max_bytes: int = 256 * 1024 * 1024  # ... or beyond this many bytes (bodies + ~200 B per entry)
    ttl_s: float | None = None  # seconds an entry may be served; None = until evicted

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("max_entries", "max_bytes"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.ttl_s is not None and self.ttl_s <= 0:
            out.append(("ttl_s", f"must be > 0 seconds or null (no expiry), got {self.ttl_s}"))
        return out


class MemoryCache(CachePlugin):
    Config = MemoryCacheConfig
    shared_across_processes = False  # each API process has its own LRU

    _store: MemoryStore | None = None
    _open_lock = threading.Lock()

    def open(self) -> None:
        with self._open_lock:
            if self._store is None:
                c = self.config
                self._store = MemoryStore(c.max_entries, c.max_bytes, c.ttl_s)

    def close(self) -> None:
        pass  # nothing to flush; entries live as long as the process

    def _opened(self) -> MemoryStore:
        if self._store is None:
            self.open()
        return self._store  # type: ignore[return-value]

    def get(self, request: CacheRequest) -> CacheHit | None:
        value = self._opened().get(request.key)
        return CacheHit(value) if value is not None else None

    def put(self, request: CacheRequest, value: bytes) -> None:
        self._opened().put(request.key, bytes(value))

    def stats(self) -> dict:
        return {"plugin": "memory", "scope": "this process only", **self._opened().stats()}

    def clear(self) -> int:
        return self._opened().clear()

    def __getstate__(self) -> dict:
        # The composed API may be pickled (spawn): ship the config, never the entries.
        state = dict(self.__dict__)
        state.pop("_store", None)
        return state


PLUGIN = MemoryCache

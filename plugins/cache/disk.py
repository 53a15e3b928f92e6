"""``cache=disk``: response bodies in a diskcache (SQLite) folder shared by every API process.

Kept across restarts; a hit is one indexed SQLite read in the API process (no worker involved).
Values are stored as checksummed bytes and never pickled; the folder is private (0700). See
``plugins/cache/_diskstore.py`` for what happens with corrupted entries and foreign folders.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from framework import CacheHit, CachePlugin, CacheRequest, CheckContext
from plugins.cache._diskstore import EVICTION_POLICIES, DiskStore, folder_problem
from plugins.cache._lru import MemoryStore

DEFAULT_DIRECTORY = "~/.cache/hydraserve/responses"


@dataclass
class DiskCacheConfig:
    directory: str = DEFAULT_DIRECTORY  # created with mode 0700; "~" is expanded
    size_limit: int = 1024 * 1024 * 1024  # bytes on disk; entries are evicted beyond it
    ttl_s: float | None = None  # seconds an entry may be served; None = until evicted
    eviction_policy: str = "least-recently-stored"  # any diskcache policy; see below
    statistics: bool = False  # count hits/misses in the database (shared, but one write per lookup)
    # A small per-process LRU in front of SQLite: a repeated hit costs a dict lookup instead of a
    # query. Safe because keys are content-addressed (config + input), so a fronted answer is the
    # answer the disk holds; only used without ttl_s (a front copy would outlive the entry's TTL).
    front_entries: int = 1024  # 0 disables the front
    front_bytes: int = 64 * 1024 * 1024

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.size_limit <= 0:
            out.append(("size_limit", f"must be > 0 bytes, got {self.size_limit}"))
        if self.ttl_s is not None and self.ttl_s <= 0:
            out.append(("ttl_s", f"must be > 0 seconds or null (no expiry), got {self.ttl_s}"))
        if self.eviction_policy not in EVICTION_POLICIES:
            out.append(("eviction_policy", f"must be one of {', '.join(EVICTION_POLICIES)}, "
                        f"got '{self.eviction_policy}'"))
        if self.front_entries < 0 or self.front_bytes < 0:
            out.append(("front_entries", "front_entries and front_bytes must be >= 0 (0 disables the front)"))
        if not self.directory:
            out.append(("directory", f"must name a folder, e.g. {DEFAULT_DIRECTORY}"))
        return out


class DiskCache(CachePlugin):
    Config = DiskCacheConfig

    _store: DiskStore | None = None
    _front: MemoryStore | None = None
    _open_lock = threading.Lock()

    def check(self, ctx: CheckContext) -> list[str]:
        problem = folder_problem(self.config.directory)
        return [f"directory: {problem}"] if problem else []

    def open(self) -> None:
        with self._open_lock:
            if self._store is None:
                c = self.config
                store = DiskStore(c.directory, c.size_limit, c.ttl_s, c.eviction_policy, c.statistics)
                store.open()
                self._store = store
                if c.front_entries > 0 and c.front_bytes > 0 and c.ttl_s is None:
                    self._front = MemoryStore(c.front_entries, c.front_bytes, None)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _opened(self) -> DiskStore:
        if self._store is None:
            self.open()
        return self._store  # type: ignore[return-value]

    def get(self, request: CacheRequest) -> CacheHit | None:
        store = self._opened()
        front = self._front
        if front is not None:
            value = front.get(request.key)
            if value is not None:
                return CacheHit(value)
        value = store.get(request.key)
        if value is None:
            return None
        if front is not None:
            front.put(request.key, value)
        return CacheHit(value)

    def put(self, request: CacheRequest, value: bytes) -> None:
        self._opened().put(request.key, value)
        if self._front is not None:
            self._front.put(request.key, bytes(value))

    def stats(self) -> dict:
        return {"plugin": "disk", **self._opened().stats()}

    def clear(self) -> int:
        if self._front is not None:
            self._front.clear()
        return self._opened().clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_store", None)  # an open SQLite connection never crosses a process boundary
        state.pop("_front", None)
        return state


PLUGIN = DiskCache

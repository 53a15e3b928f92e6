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

DEFAULT_DIRECTORY = "~/.cache/hydraserve/responses"


@dataclass
class DiskCacheConfig:
    directory: str = DEFAULT_DIRECTORY  # created with mode 0700; "~" is expanded
    size_limit: int = 1024 * 1024 * 1024  # bytes on disk; entries are evicted beyond it
    ttl_s: float | None = None  # seconds an entry may be served; None = until evicted
    eviction_policy: str = "least-recently-stored"  # any diskcache policy; see below
    statistics: bool = False  # count hits/misses in the database (shared, but one write per lookup)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.size_limit <= 0:
            out.append(("size_limit", f"must be > 0 bytes, got {self.size_limit}"))
        if self.ttl_s is not None and self.ttl_s <= 0:
            out.append(("ttl_s", f"must be > 0 seconds or null (no expiry), got {self.ttl_s}"))
        if self.eviction_policy not in EVICTION_POLICIES:
            out.append(("eviction_policy", f"must be one of {', '.join(EVICTION_POLICIES)}, "
                        f"got '{self.eviction_policy}'"))
        if not self.directory:
            out.append(("directory", f"must name a folder, e.g. {DEFAULT_DIRECTORY}"))
        return out


class DiskCache(CachePlugin):
    Config = DiskCacheConfig

    _store: DiskStore | None = None
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

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _opened(self) -> DiskStore:
        if self._store is None:
            self.open()
        return self._store  # type: ignore[return-value]

    def get(self, request: CacheRequest) -> CacheHit | None:
        value = self._opened().get(request.key)
        return CacheHit(value) if value is not None else None

    def put(self, request: CacheRequest, value: bytes) -> None:
        self._opened().put(request.key, value)

    def stats(self) -> dict:
        return {"plugin": "disk", **self._opened().stats()}

    def clear(self) -> int:
        return self._opened().clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_store", None)  # an open SQLite connection never crosses a process boundary
        return state


PLUGIN = DiskCache

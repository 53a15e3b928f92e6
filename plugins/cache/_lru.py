"""A thread-safe, byte-bounded LRU of ``bytes`` values with an optional TTL (one per process).

Used by ``cache=memory`` and by ``cache=semantic store=memory``. A lookup is a dict access and a
``move_to_end`` under one lock: the cheapest hit there is, at the price of one copy per API process
(and nothing kept across restarts).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# Per-entry bookkeeping (the key string, tuple, dict slot) counted against max_bytes, so a flood of
# tiny responses cannot hold unbounded memory under a byte limit that only counts the values.
ENTRY_OVERHEAD = 200


class MemoryStore:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float | None,
                 clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0
        self.rejected = 0  # values larger than max_bytes on their own

    @staticmethod
    def _cost(key: str, value: bytes) -> int:
        return len(value) + len(key) + ENTRY_OVERHEAD

    def get(self, key: str, count: bool = True) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += count
                return None
            value, expires = entry
            if expires is not None and expires <= self._clock():
                self._drop(key, value)
                self.expired += 1
                self.misses += count
                return None
            self._data.move_to_end(key)
            self.hits += count
            return value

    def put(self, key: str, value: bytes) -> bool:
        """Store ``value``; False when it is larger than the whole byte budget (not stored)."""
        cost = self._cost(key, value)
        if cost > self.max_bytes:
            with self._lock:
                self.rejected += 1
            return False
        expires = self._clock() + self.ttl_s if self.ttl_s is not None else None
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._cost(key, old[0])
            self._data[key] = (value, expires)
            self._bytes += cost
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                old_key, (old_value, _) = self._data.popitem(last=False)
                self._bytes -= self._cost(old_key, old_value)
                self.evictions += 1
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._drop(key, entry[0])

    def _drop(self, key: str, value: bytes) -> None:
        del self._data[key]
        self._bytes -= self._cost(key, value)

    def clear(self) -> int:
        with self._lock:
            n = len(self._data)
            self._data.clear()
            self._bytes = 0
            return n

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._data),
                    "bytes": self._bytes, "evictions": self.evictions, "expired": self.expired,
                    "rejected_too_large": self.rejected, "max_entries": self.max_entries,
                    "max_bytes": self.max_bytes, "ttl_s": self.ttl_s}

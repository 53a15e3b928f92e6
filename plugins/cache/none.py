"""``cache=none``: every request runs the model."""

from __future__ import annotations

from framework import CacheHit, CachePlugin, CacheRequest


class NoCache(CachePlugin):
    @property
    def enabled(self) -> bool:
        return False

    def get(self, request: CacheRequest) -> CacheHit | None:
        return None

    def put(self, request: CacheRequest, value: bytes) -> None:
        return None


PLUGIN = NoCache

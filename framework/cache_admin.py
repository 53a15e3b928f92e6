"""``hydraserve cache stats|clear``: inspect or empty the configured response cache from the shell.

The CLI runs in its own process, so what it can reach depends on the store: a disk store (``disk``,
``semantic`` with ``store: disk``) is the same folder the server uses, so its entries are shared
(hit/miss counters are per process unless the store's ``statistics: true``); a memory store lives
inside each server process and is out of reach (the answer says so instead of reporting zeros as
if they were the server's).
"""

from __future__ import annotations

from framework.plugin import CachePlugin


def _open(cache: CachePlugin) -> None:
    # Just the store for admin work (the semantic cache skips loading its embedder).
    cache.open_store()


def _in_process_only(cache: CachePlugin) -> bool:
    return not cache.shared_across_processes


def cache_stats(cache_plugin: CachePlugin) -> dict:
    """The configured store's statistics (entries, bytes, hits/misses where the store keeps them)."""
    if not cache_plugin.enabled:
        return {"enabled": False, "note": "cache=none: nothing is cached"}
    _open(cache_plugin)
    try:
        out = {"enabled": True, **cache_plugin.stats()}
    finally:
        cache_plugin.close()
    if _in_process_only(cache_plugin):
        out["note"] = ("memory store: each server process keeps its own entries, out of reach of this "
                       "command; see the server's /metrics for its hits and misses")
    return out


def cache_clear(cache_plugin: CachePlugin) -> int:
    """Remove every cached response from the configured store; return how many were removed."""
    if not cache_plugin.enabled:
        return 0
    _open(cache_plugin)
    try:
        return int(cache_plugin.clear())
    finally:
        cache_plugin.close()

"""A poisoned disk-cache folder: rows whose file names point elsewhere must never touch the filesystem.

diskcache keeps a row's value file name in the ``filename`` column and removes that file (and its
emptied parent folders) when the row is dropped. Every test here plants a row the server did not
write and checks that the lookup is a miss, the row is dropped, a warning is logged, and nothing
outside the cache's own value files is read or removed.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import diskcache
import httpx
import pytest

from framework import CacheRequest
from framework.cache_key import cache_scope
from plugins.cache import _diskstore
from plugins.cache.disk import DiskCache, DiskCacheConfig

SCOPE = cache_scope({"model": "m", "weights": "w1"}, {"name": "none"}, {"max_length": 256})


def _disk(folder: Path) -> DiskCache:
    cache = DiskCache(DiskCacheConfig(directory=str(folder), front_entries=0))
    cache.open()
    return cache


def _req(key: str) -> CacheRequest:
    return CacheRequest(key=key, texts=None, scope=SCOPE)


def _plant(folder: Path, mode: int, filename: str | None, key: str | None = None) -> None:
    """Rewrite one row (``key``, or every row) as a file-backed value with ``filename``."""
    con = sqlite3.connect(folder / "cache.db")
    with con:
        where, args = ("WHERE key = ?", (key,)) if key is not None else ("", ())
        con.execute(f"UPDATE Cache SET mode = ?, value = NULL, filename = ? {where}", (mode, filename, *args))
    con.close()


def _row_count(folder: Path) -> int:
    con = sqlite3.connect(folder / "cache.db")
    try:
        return con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def canary(tmp_path) -> Path:
    path = tmp_path / "canary_dir" / "canary.txt"
    path.parent.mkdir()
    path.write_text("do not delete")
    return path


@pytest.mark.parametrize("mode", [diskcache.core.MODE_BINARY, diskcache.core.MODE_TEXT])
def test_a_row_naming_a_file_outside_the_folder_is_a_miss_and_deletes_nothing(tmp_path, canary, mode, caplog):
    folder = tmp_path / "a" / "cache"
    cache = _disk(folder)
    cache.put(_req("k"), b"answer")
    _plant(folder, mode, "../../canary_dir/canary.txt", "k")
    with caplog.at_level(logging.WARNING, "hydraserve.cache"):
        assert cache.get(_req("k")) is None
    assert canary.read_text() == "do not delete"
    assert _row_count(folder) == 0, "the planted row is dropped"
    assert "not one this cache writes" in caplog.text
    assert "refused to remove" in caplog.text


@pytest.mark.parametrize("name", [
    "/etc/passwd", "ab/cd/../../../canary_dir/canary.txt", "canary.txt", "ab/cd/" + "0" * 28 + ".pyc",
    "AB/CD/" + "0" * 28 + ".val", "ab\\cd\\" + "0" * 28 + ".val", "",
])
def test_only_the_exact_shape_of_diskcache_names_is_accepted(tmp_path, name):
    disk = _diskstore.BytesOnlyDisk(str(tmp_path))
    assert disk.value_file(name) is None
    assert disk.value_file(None) is None
    assert disk.value_file("ab/cd/" + "0" * 28 + ".val") == str(tmp_path.resolve() / "ab/cd" / ("0" * 28 + ".val"))


def test_a_file_mode_with_no_file_name_is_a_miss_not_an_error(tmp_path):
    folder = tmp_path / "cache"
    cache = _disk(folder)
    cache.put(_req("k"), b"answer")
    _plant(folder, diskcache.core.MODE_BINARY, None, "k")
    assert cache.get(_req("k")) is None
    assert _row_count(folder) == 0
    cache.put(_req("k"), b"answer again")  # the input is cached afresh afterwards
    assert cache.get(_req("k")).value == b"answer again"


def test_a_symlinked_subfolder_cannot_lead_a_name_outside(tmp_path, canary):
    """A well-shaped name whose folder is a symlink to elsewhere is refused (read and removal)."""
    folder = tmp_path / "cache"
    cache = _disk(folder)
    cache.put(_req("k"), b"answer")
    target = canary.parent / "cd"
    target.mkdir()
    victim = target / ("0" * 28 + ".val")
    victim.write_bytes(_diskstore.frame(b"planted answer"))
    (folder / "ab").symlink_to(canary.parent)
    _plant(folder, diskcache.core.MODE_BINARY, "ab/cd/" + "0" * 28 + ".val", "k")
    assert cache.get(_req("k")) is None, "a value read from outside the folder is never served"
    assert victim.exists() and canary.exists()


def test_clearing_and_evicting_planted_rows_removes_no_outside_file(tmp_path, canary):
    folder = tmp_path / "a" / "cache"
    cache = _disk(folder)
    for i in range(3):
        cache.put(_req(f"k{i}"), b"answer")
    _plant(folder, diskcache.core.MODE_BINARY, "../../canary_dir/canary.txt")
    assert cache.clear() == 3
    assert canary.read_text() == "do not delete"


def test_big_values_still_live_in_value_files_and_are_served(tmp_path):
    """The check must not break diskcache's own files: a value above MIN_FILE_SIZE round-trips."""
    cache = _disk(tmp_path / "cache")
    big = b"x" * (_diskstore.MIN_FILE_SIZE + 10)
    cache.put(_req("big"), big)
    assert cache.get(_req("big")).value == big
    cache.clear()
    assert not [p for p in (tmp_path / "cache").rglob("*.val")], "clear removes its own value files"


def test_a_served_request_on_a_poisoned_folder_deletes_nothing(tmp_path, canary):
    """The issue's reproduction over HTTP: serve, cache an answer, stop, poison the row, serve again."""
    from conftest import ServerPool

    folder = tmp_path / "a" / "cache"
    body = {"input": "the same request"}
    overrides = ["model=echo", "cache=disk", f"cache.directory={folder}", "tracing=none"]
    pool = ServerPool(tmp_path / "run1")
    try:
        server = pool(overrides)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/predict", json=body).status_code == 200
    finally:
        pool.stop_all()
    assert _row_count(folder) == 1, "the answer was stored"
    _plant(folder, diskcache.core.MODE_BINARY, "../../canary_dir/canary.txt")

    pool = ServerPool(tmp_path / "run2")
    try:
        server = pool(overrides)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/predict", json=body)
            assert r.status_code == 200, r.text
            assert r.json() == {"output": "the same request"}
            assert r.headers["x-cache"] == "miss"
        assert "refused to remove" in server.log_tail(200)
    finally:
        pool.stop_all()
    assert canary.read_text() == "do not delete"

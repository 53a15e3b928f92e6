"""Response cache plugins at unit level (no server): memory, disk, semantic, keys, admin.

The HTTP-level behaviour (X-Cache header, Cache-Control: no-cache, several API processes behind
one server) is tested with the server in the lead's tests.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sqlite3
import stat
import threading
from pathlib import Path

import diskcache
import numpy as np
import pytest

from framework import CacheRequest
from framework.cache_admin import cache_clear, cache_stats
from framework.cache_key import cache_key, cache_scope
from plugins.cache import _diskstore
from plugins.cache._diskstore import BytesOnlyDisk, UnsafeEntry
from plugins.cache.disk import DiskCache, DiskCacheConfig
from plugins.cache.memory import MemoryCache, MemoryCacheConfig
from plugins.cache.semantic import SemanticCache, SemanticCacheConfig

SCOPE = cache_scope({"model": "m", "weights": "w1"}, {"name": "none"}, {"max_length": 256})


def req(key: str, texts: list[str] | None = None, scope: str = SCOPE) -> CacheRequest:
    return CacheRequest(key=key, texts=texts, scope=scope)


def memory(**kw) -> MemoryCache:
    cache = MemoryCache(MemoryCacheConfig(**kw))
    cache.open()
    return cache


def disk(folder: Path, **kw) -> DiskCache:
    # The SQLite store itself (what other processes and restarts see); the front has its own test.
    kw.setdefault("front_entries", 0)
    cache = DiskCache(DiskCacheConfig(directory=str(folder), **kw))
    cache.open()
    return cache


def _rows(folder: Path) -> list[tuple]:
    with sqlite3.connect(folder / "cache.db") as con:
        return con.execute("SELECT rowid, key, mode, filename FROM Cache").fetchall()


def _sql(folder: Path, query: str, args: tuple = ()) -> None:
    con = sqlite3.connect(folder / "cache.db")
    with con:
        con.execute(query, args)
    con.close()


# ------------------------------------------------------------------------------------- keys
class TestKeys:
    ITEMS = [{"text": "hello", "opts": {"a": 1, "b": 2}}]

    def test_key_is_stable_and_ignores_dict_order(self):
        other = [{"opts": {"b": 2, "a": 1}, "text": "hello"}]
        assert cache_key(SCOPE, self.ITEMS) == cache_key(SCOPE, other)
        assert cache_key(SCOPE, ["1"]) != cache_key(SCOPE, [1])

    @pytest.mark.parametrize("change", ["weights", "model", "quant_name", "quant_param", "preproc", "items"])
    def test_every_part_changes_the_key(self, change):
        ident, quant, pre = {"model": "m", "weights": "w1"}, {"name": "none"}, {"max_length": 256}
        items = ["hello"]
        base = cache_key(cache_scope(ident, quant, pre), items)
        if change == "weights":
            ident = {**ident, "weights": "w2"}
        elif change == "model":
            ident = {**ident, "model": "m2"}
        elif change == "quant_name":
            quant = {"name": "int8_dynamic"}
        elif change == "quant_param":
            quant = {"name": "none", "min_quality": 0.99}
        elif change == "preproc":
            pre = {"max_length": 128}
        else:
            items = ["hello!"]
        assert cache_key(cache_scope(ident, quant, pre), items) != base

    def test_non_json_items_are_keyed_by_content(self):
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert cache_key(SCOPE, [a]) == cache_key(SCOPE, [a.copy()])
        assert cache_key(SCOPE, [a]) != cache_key(SCOPE, [a.astype(np.float64)])  # dtype counts
        assert cache_key(SCOPE, [a]) != cache_key(SCOPE, [a.reshape(3, 2)])  # shape counts
        assert cache_key(SCOPE, [b"\x00\x01"]) != cache_key(SCOPE, [b"\x00\x02"])
        with pytest.raises(TypeError, match="cannot build a cache key"):
            cache_key(SCOPE, [object()])


# ----------------------------------------------------------------------------------- memory
class TestMemory:
    def test_hit_miss_and_stats(self):
        cache = memory()
        assert cache.get(req("a")) is None
        cache.put(req("a"), b'{"x": 1}')
        hit = cache.get(req("a"))
        assert hit.value == b'{"x": 1}' and hit.kind == "hit"
        s = cache.stats()
        assert (s["hits"], s["misses"], s["entries"]) == (1, 1, 1)
        assert s["bytes"] > 8

    def test_lru_evicts_least_recently_used(self):
        cache = memory(max_entries=2)
        cache.put(req("a"), b"A")
        cache.put(req("b"), b"B")
        cache.get(req("a"))  # a is now the most recently used
        cache.put(req("c"), b"C")
        assert cache.get(req("b")) is None
        assert cache.get(req("a")).value == b"A" and cache.get(req("c")).value == b"C"
        assert cache.stats()["evictions"] == 1

    def test_byte_limit_evicts(self):
        cache = memory(max_bytes=3000)
        for k in "abcd":
            cache.put(req(k), bytes(1000))
        s = cache.stats()
        assert s["bytes"] <= 3000 and s["entries"] < 4 and s["evictions"] >= 1
        assert cache.get(req("a")) is None and cache.get(req("d")) is not None
        cache.put(req("huge"), bytes(10_000))  # larger than the whole budget: not stored
        assert cache.get(req("huge")) is None and cache.get(req("d")) is not None

    def test_ttl_expires(self):
        now = [1000.0]
        cache = memory(ttl_s=5)
        cache._store._clock = lambda: now[0]
        cache.put(req("a"), b"A")
        now[0] += 4
        assert cache.get(req("a")) is not None
        now[0] += 2
        assert cache.get(req("a")) is None
        assert cache.stats()["entries"] == 0

    def test_thread_safe_under_concurrent_use(self):
        cache = memory(max_entries=50)

        def work(n: int) -> None:
            for i in range(300):
                cache.put(req(f"{n}-{i % 80}"), b"x" * (i % 7))
                cache.get(req(f"{(n + 1) % 4}-{i % 80}"))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = cache.stats()
        assert s["entries"] == 50 and s["hits"] + s["misses"] == 1200

    def test_config_problems(self):
        found = {k for k, _ in MemoryCacheConfig(max_entries=0, ttl_s=-1).problems()}
        assert found == {"max_entries", "ttl_s"}


# ------------------------------------------------------------------------------------- disk
class TestDisk:
    def test_persists_across_reopen(self, tmp_path):
        folder = tmp_path / "c"
        first = disk(folder)
        first.put(req("k"), b'{"embeddings": [[1.0]]}')
        first.close()
        second = disk(folder)  # a new plugin instance: another process, or after a restart
        hit = second.get(req("k"))
        assert hit is not None and hit.value == b'{"embeddings": [[1.0]]}' and hit.kind == "hit"
        assert second.stats()["entries"] == 1

    def test_folder_created_0700(self, tmp_path):
        folder = tmp_path / "new" / "responses"
        disk(folder)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    def test_loose_folder_is_tightened(self, tmp_path, caplog):
        folder = tmp_path / "loose"
        folder.mkdir()
        os.chmod(folder, 0o777)
        with caplog.at_level(logging.WARNING, "hydraserve.cache"):
            disk(folder)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert "0700" in caplog.text

    def test_foreign_folder_is_refused(self, tmp_path, monkeypatch):
        folder = tmp_path / "theirs"
        folder.mkdir()
        monkeypatch.setattr(_diskstore, "_own_uid", lambda: folder.stat().st_uid + 1)
        plugin = DiskCache(DiskCacheConfig(directory=str(folder)))
        assert any(m.startswith("directory: ") and "owned by uid" in m for m in plugin.check(None))
        with pytest.raises(_diskstore.CacheFolderError, match="cache.directory"):
            plugin.open()

    def test_garbage_in_the_row_is_a_miss_with_warning(self, tmp_path, caplog):
        folder = tmp_path / "c"
        cache = disk(folder)
        cache.put(req("k"), b"good answer")
        _sql(folder, "UPDATE Cache SET value = ? WHERE key = ?", (b"garbage!garbage", "k"))
        with caplog.at_level(logging.WARNING, "hydraserve.cache"):
            assert cache.get(req("k")) is None
        assert "unusable" in caplog.text
        assert cache.stats()["entries"] == 0  # dropped, so the next answer replaces it
        cache.put(req("k"), b"fresh")
        assert cache.get(req("k")).value == b"fresh"

    def test_front_serves_repeated_hits_and_is_emptied_by_clear(self, tmp_path):
        folder = tmp_path / "c"
        cache = disk(folder, front_entries=16)
        cache.put(req("k"), b"good answer")
        _sql(folder, "UPDATE Cache SET value = ? WHERE key = ?", (b"garbage!garbage", "k"))
        assert cache.get(req("k")).value == b"good answer"  # answered by the front, no SQLite read
        other = disk(folder)  # another process reads the store: the damaged row is a miss there
        assert other.get(req("k")) is None
        cache.clear()
        assert cache.get(req("k")) is None

    def test_no_front_with_a_ttl(self, tmp_path):
        cache = disk(tmp_path / "c", front_entries=16, ttl_s=60)
        assert cache._front is None  # a front copy could outlive the entry's TTL

    def test_a_pickled_row_is_never_unpickled(self, tmp_path, caplog):
        folder = tmp_path / "c"
        cache = disk(folder)
        cache.put(req("k"), b"good answer")
        payload = pickle.dumps(_Boom())
        _sql(folder, "UPDATE Cache SET value = ?, mode = ? WHERE key = ?",
             (payload, diskcache.core.MODE_PICKLE, "k"))
        with caplog.at_level(logging.WARNING, "hydraserve.cache"):
            assert cache.get(req("k")) is None
        assert not _Boom.unpickled
        assert "pickled" in caplog.text and "unusable" in caplog.text

    def test_garbage_in_a_value_file_is_a_miss(self, tmp_path, caplog):
        folder = tmp_path / "c"
        cache = disk(folder)
        big = b"x" * (_diskstore.MIN_FILE_SIZE + 10)  # stored in a value file, not in the row
        cache.put(req("big"), big)
        assert cache.get(req("big")).value == big
        (filename,) = [r[3] for r in _rows(folder) if r[1] == "big"]
        (folder / filename).write_bytes(b"overwritten")
        with caplog.at_level(logging.WARNING, "hydraserve.cache"):
            assert cache.get(req("big")) is None
        assert "checksum" in caplog.text
        cache.put(req("gone"), big)
        (filename,) = [r[3] for r in _rows(folder) if r[1] == "gone"]
        (folder / filename).unlink()
        assert cache.get(req("gone")) is None

    def test_unreadable_database_serves_without_cache(self, tmp_path, caplog):
        folder = tmp_path / "c"
        folder.mkdir(mode=0o700)
        (folder / "cache.db").write_bytes(b"this is not a database" * 100)
        cache = DiskCache(DiskCacheConfig(directory=str(folder)))
        with caplog.at_level(logging.ERROR, "hydraserve.cache"):
            cache.open()
        assert "cannot be opened" in caplog.text
        assert cache.get(req("k")) is None
        cache.put(req("k"), b"v")  # no crash
        assert cache.stats()["broken"]
        cache.clear()  # resets the folder
        cache.put(req("k"), b"v")
        assert cache.get(req("k")).value == b"v"

    def test_the_disk_refuses_to_pickle(self, tmp_path):
        d = BytesOnlyDisk(str(tmp_path))
        for value in ({"a": 1}, [1], 1.5, None, _Boom()):
            with pytest.raises(TypeError, match="no pickling"):
                d.store(value, False)
        with pytest.raises(TypeError):
            d.put(("tuple", "key"))
        with pytest.raises(UnsafeEntry):
            d.fetch(diskcache.core.MODE_PICKLE, None, pickle.dumps(1), False)
        with pytest.raises(UnsafeEntry):
            d.get(pickle.dumps(("a",)), False)
        raw = diskcache.Cache(str(tmp_path / "raw"), disk=BytesOnlyDisk)
        with pytest.raises(TypeError):
            raw.set("k", {"a": 1})
        raw.close()

    def test_ttl_expires(self, tmp_path, monkeypatch):
        cache = disk(tmp_path / "c", ttl_s=60)
        cache.put(req("k"), b"v")
        assert cache.get(req("k")) is not None
        real = diskcache.core.time.time
        monkeypatch.setattr(diskcache.core.time, "time", lambda: real() + 61)
        assert cache.get(req("k")) is None

    def test_size_limit_evicts(self, tmp_path):
        cache = disk(tmp_path / "c", size_limit=200_000)
        for i in range(40):
            cache.put(req(f"k{i}"), os.urandom(20_000))
        s = cache.stats()
        assert s["entries"] < 40
        assert cache.get(req("k39")) is not None and cache.get(req("k0")) is None

    def test_config_problems(self):
        found = {k for k, _ in DiskCacheConfig(size_limit=0, eviction_policy="fifo").problems()}
        assert found == {"size_limit", "eviction_policy"}

    def test_two_processes_share_hits(self, tmp_path):
        folder = str(tmp_path / "shared")
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        procs = [ctx.Process(target=_share_worker, args=(folder, n, barrier, results)) for n in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = sorted(results.get(timeout=5) for _ in procs)
        assert [p.exitcode for p in procs] == [0, 0]
        assert got == [(0, b"from 1"), (1, b"from 0")]


class _Boom:
    unpickled = False

    def __reduce__(self):
        return (_set_unpickled, ())


def _set_unpickled():
    _Boom.unpickled = True
    return "pwned"


def _share_worker(folder: str, n: int, barrier, results) -> None:
    cache = DiskCache(DiskCacheConfig(directory=folder))
    cache.open()  # after fork, as the server's API processes do
    cache.put(req(f"key{n}"), f"from {n}".encode())
    barrier.wait(30)
    hit = cache.get(req(f"key{1 - n}"))
    results.put((n, hit.value if hit else None))
    cache.close()


# ------------------------------------------------------------------------------------ admin
def test_admin_stats_and_clear_on_disk(tmp_path):
    folder = tmp_path / "c"
    server = disk(folder)
    for i in range(3):
        server.put(req(f"k{i}"), b"v")
    stats = cache_stats(DiskCache(DiskCacheConfig(directory=str(folder))))
    assert stats["enabled"] and stats["entries"] == 3 and stats["bytes"] > 0
    assert cache_clear(DiskCache(DiskCacheConfig(directory=str(folder)))) == 3
    assert server.get(req("k0")) is None


def test_admin_on_memory_says_it_is_per_process():
    stats = cache_stats(MemoryCache(MemoryCacheConfig()))
    assert "each server process" in stats["note"]


def test_yaml_options_compose_and_validate(tmp_path):
    from framework.config import compose, validate

    for name in ("memory", "disk", "semantic", "none"):
        overrides = [f"cache={name}"]
        if name in ("disk", "semantic"):
            overrides.append(f"cache.directory={tmp_path / name}")
        resolved = validate(compose(overrides))
        assert type(resolved.cache).__module__ == f"plugins.cache.{name}"


# ---------------------------------------------------------------------------------- semantic
# Near-duplicates a conservative semantic cache should serve, and related requests it must not.
# Cosine similarities (all-MiniLM-L6-v2) in docs/caching.md.
PARAPHRASES = [
    ("How do I reset my password?", "how do i reset my password"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("Cancel my order please", "Please cancel my order"),
    ("Where is my package?", "Where's my package?"),
    ("I want a refund for my purchase.", "I would like a refund for my purchase."),
    ("How do I change my shipping address?", "How can I change my shipping address?"),
    ("What are your opening hours?", "what are your opening hours"),
    ("Can you recommend a good Italian restaurant nearby?",
     "Could you recommend a good Italian restaurant nearby?"),
    ("How to delete my account", "How to delete my account?"),
    ("Is there a student discount?", "Is there a student discount available?"),
    ("How do I update my billing information?", "How can I update my billing information?"),
]
DIFFERENT = [
    ("reset my password", "reset my username"),
    ("cancel my order", "track my order"),
    ("How do I reset my password?", "How do I change my email address?"),
    ("I want to cancel my order", "I don't want to cancel my order"),
    ("Transfer 100 dollars to Alice", "Transfer 1000 dollars to Alice"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("Book a flight to Paris", "Book a flight from Paris"),
    ("Book a flight to London on Monday", "Book a flight to London on Tuesday"),
    ("Turn on the lights in the kitchen", "Turn off the lights in the kitchen"),
    ("What is the weather in Paris today?", "What is the weather in Paris tomorrow?"),
    ("Alice sent money to Bob", "Bob sent money to Alice"),
    ("python list sort ascending", "python list sort descending"),
    ("How do I lock my account?", "How do I unlock my account?"),
    ("Convert Celsius to Fahrenheit", "Convert Fahrenheit to Celsius"),
    ("How do I install Python on Windows?", "How do I install Python on Linux?"),
    ("What is the price of an iPhone 14?", "What is the price of an iPhone 15?"),
]


def semantic(tmp_path: Path | None = None, **kw) -> SemanticCache:
    if tmp_path is None:
        kw.setdefault("store", "memory")
    else:
        kw.setdefault("directory", str(tmp_path / "semantic"))
    cache = SemanticCache(SemanticCacheConfig(**kw))
    cache.open()
    return cache


def put_text(cache: SemanticCache, texts: list[str], scope: str = SCOPE) -> CacheRequest:
    r = req(cache_key(scope, texts), texts, scope)
    cache.get(r)  # as the request handler does: a lookup, then the answer is stored
    cache.put(r, f"answer for {texts}".encode())
    return r


def lookup(cache: SemanticCache, texts: list[str], scope: str = SCOPE):
    return cache.get(req(cache_key(scope, texts), texts, scope))


@pytest.mark.slow
class TestSemantic:
    def test_labelled_pairs_at_the_default_threshold(self):
        cache = semantic()
        wrong = []
        for label, pairs in (("hit", PARAPHRASES), ("miss", DIFFERENT)):
            for i, (cached, asked) in enumerate(pairs):
                scope = f"{label}-{i}"  # one scope per pair: pairs never see each other
                put_text(cache, [cached], scope)
                hit = lookup(cache, [asked], scope)
                got = "hit" if hit is not None else "miss"
                if got != label:
                    wrong.append((label, cached, asked))
                elif hit is not None:
                    assert hit.kind == "semantic-hit" and hit.value == f"answer for {[cached]}".encode()
        assert not wrong, f"mislabelled at threshold {cache.config.threshold}: {wrong}"
        assert cache.stats()["guard_rejections"] > 0

    def test_exact_is_checked_first(self):
        cache = semantic()
        put_text(cache, ["How do I reset my password?"])
        hit = lookup(cache, ["How do I reset my password?"])
        assert hit.kind == "hit"
        assert cache.stats()["hits"] == 1

    def test_never_crosses_scopes(self):
        cache = semantic()
        other = cache_scope({"model": "m", "weights": "w2"}, {"name": "none"}, {"max_length": 256})
        put_text(cache, ["How do I reset my password?"], SCOPE)
        assert lookup(cache, ["How can I reset my password?"], other) is None
        assert lookup(cache, ["How can I reset my password?"], SCOPE).kind == "semantic-hit"

    def test_multi_text_requests_match_position_by_position(self):
        cache = semantic()
        put_text(cache, ["Where is my package?", "How do I reset my password?"])
        assert lookup(cache, ["Where's my package?", "How can I reset my password?"]).kind == "semantic-hit"
        assert lookup(cache, ["How can I reset my password?", "Where's my package?"]) is None  # order
        assert lookup(cache, ["Where's my package?", "cancel my order"]) is None
        assert lookup(cache, ["Where's my package?"]) is None  # another number of texts

    def test_long_texts_and_non_text_requests_are_exact_only(self):
        cache = semantic(max_tokens=16)
        long = "please tell me " + "about the history of the roman empire " * 3
        put_text(cache, [long])
        assert lookup(cache, [long + " now"]) is None
        assert lookup(cache, [long]).kind == "hit"
        r = req("tensor-key", None)
        assert cache.get(r) is None
        cache.put(r, b"tensor answer")
        assert cache.get(r).kind == "hit"
        assert cache.stats()["not_eligible"] >= 2

    def test_index_is_rebuilt_after_reopen(self, tmp_path):
        first = semantic(tmp_path)
        put_text(first, ["What is the capital of France?"])
        first.close()
        second = semantic(tmp_path)  # a restarted server
        assert second.stats()["index_entries"] == 1
        assert lookup(second, ["What's the capital of France?"]).kind == "semantic-hit"

    def test_processes_share_entries_and_clears(self, tmp_path):
        a, b = semantic(tmp_path), semantic(tmp_path)  # two API processes on one store
        put_text(a, ["Where is my package?"])
        assert lookup(b, ["Where's my package?"]).kind == "semantic-hit"
        assert cache_clear(SemanticCache(SemanticCacheConfig(directory=str(tmp_path / "semantic")))) == 1
        assert lookup(a, ["Where's my package?"]) is None
        assert lookup(b, ["Where's my package?"]) is None
        put_text(b, ["Cancel my order please"])
        assert lookup(a, ["Please cancel my order"]).kind == "semantic-hit"

    def test_evicted_response_is_a_miss(self):
        cache = semantic(max_bytes=700)  # the store keeps two answers; the index keeps all three
        put_text(cache, ["Where is my package?"])
        put_text(cache, ["reset my username"])
        put_text(cache, ["track my order"])
        assert lookup(cache, ["Where's my package?"]) is None

    def test_corrupted_record_is_skipped_at_rebuild(self, tmp_path, caplog):
        first = semantic(tmp_path)
        put_text(first, ["Where is my package?"])
        put_text(first, ["What is the capital of France?"])
        first.close()
        folder = tmp_path / "semantic"
        _sql(folder, "UPDATE Cache SET value = ? WHERE key = ?",
             (_diskstore.frame(b"\x00\x00\x00\x05{bad}xx"), "sem:000000000001"))
        with caplog.at_level(logging.WARNING, "hydraserve.cache"):
            second = semantic(tmp_path)
        assert "unusable" in caplog.text
        assert second.stats()["index_entries"] == 1
        assert lookup(second, ["What's the capital of France?"]).kind == "semantic-hit"

    def test_admin_stats_do_not_load_the_embedder(self, tmp_path):
        put_text(semantic(tmp_path), ["Where is my package?"])
        stats = cache_stats(SemanticCache(SemanticCacheConfig(directory=str(tmp_path / "semantic"))))
        assert stats["store"]["entries"] == 1 and stats["embedding_records"] == 1

    def test_config_problems(self):
        bad = SemanticCacheConfig(threshold=1.5, store="redis", model_path="/nope")
        found = {k for k, _ in bad.problems()}
        assert found == {"threshold", "store", "model_path"}

"""``cache=semantic``: exact hits first, then answers to near-identical text requests.

Lookup order for a request:

1. the exact key in the wrapped store (``store: disk`` by default, or ``memory``) -> ``X-Cache: hit``;
2. for text requests only (``ModelPlugin.texts`` not ``None``), at most ``max_texts`` texts each at
   most ``max_tokens`` tokens long: embed the texts with all-MiniLM-L6-v2 (CPU, in the API process),
   find cached requests **of the same scope** (same model, weights, quantization, preprocessing,
   route and response format) with the same number of texts whose every same-position cosine
   similarity is >= ``threshold``, and which pass the lexical guard (``_guard.py``: numbers,
   negations, directions, word order must agree) -> that request's answer, ``X-Cache: semantic-hit``;
3. otherwise a miss: the model runs and ``put`` stores the answer and its embeddings.

The vector index lives in memory and is bounded by ``max_entries``. With ``store: disk`` each
entry's embeddings are also written to the store (``sem:<seq>`` records beside the responses), so
the index is rebuilt at start-up and every API process picks up the others' entries (it reads the
shared sequence counter before each semantic lookup). Embedding costs a few milliseconds of CPU per
exact miss; that is the price of the extra hits.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from framework import CacheHit, CachePlugin, CacheRequest, CheckContext
from plugins.cache._diskstore import EVICTION_POLICIES, DiskStore, folder_problem
from plugins.cache._embedder import TextEmbedder
from plugins.cache._guard import Signature, mismatch
from plugins.cache._lru import MemoryStore
from plugins.cache._vector_index import VectorIndex

log = logging.getLogger("hydraserve.cache")

STORES = ("disk", "memory")
SEQ_KEY = "sem:seq"  # shared counter: number of embedding records ever written
EPOCH_KEY = "sem:epoch"  # changes when the store is cleared: every process rebuilds its index
RECORD_PREFIX = "sem:"
_LEN = struct.Struct(">I")


@dataclass
class SemanticCacheConfig:
    threshold: float = 0.95  # lowest cosine similarity served as a semantic hit (calibrated; see docs)
    guard: bool = True  # also require numbers, negations, directions and word order to agree
    store: str = "disk"  # exact store wrapped: disk (shared, persistent) or memory (per process)
    max_entries: int = 10_000  # requests in the vector index (and in the memory store)
    max_texts: int = 8  # requests with more texts are matched exactly only
    max_tokens: int = 128  # texts longer than this (model tokens) are matched exactly only
    model_path: str | None = None  # embedder: a local HF folder; null = packaged all-MiniLM-L6-v2
    threads: int = 1  # torch CPU threads for the embedder in each API process
    ttl_s: float | None = None  # seconds an entry may be served; None = until evicted
    # store: disk
    directory: str = "~/.cache/hydraserve/semantic"  # created with mode 0700
    size_limit: int = 1024 * 1024 * 1024  # bytes on disk
    eviction_policy: str = "least-recently-stored"
    statistics: bool = False  # count hits/misses in the database (shared, one write per lookup)
    # store: memory
    max_bytes: int = 256 * 1024 * 1024

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0.0 < self.threshold <= 1.0:
            out.append(("threshold", f"must be within (0, 1], got {self.threshold}"))
        if self.store not in STORES:
            out.append(("store", f"must be one of {', '.join(STORES)}, got '{self.store}'"))
        for name in ("max_entries", "max_texts", "max_tokens", "threads", "size_limit", "max_bytes"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.ttl_s is not None and self.ttl_s <= 0:
            out.append(("ttl_s", f"must be > 0 seconds or null (no expiry), got {self.ttl_s}"))
        if self.eviction_policy not in EVICTION_POLICIES:
            out.append(("eviction_policy", f"must be one of {', '.join(EVICTION_POLICIES)}, "
                        f"got '{self.eviction_policy}'"))
        if self.model_path is not None and not Path(os.path.expanduser(self.model_path)).is_dir():
            out.append(("model_path", f"no such model folder: {self.model_path}; point it at a local "
                        "Hugging Face sentence-embedding folder, or null for the packaged all-MiniLM-L6-v2"))
        return out


def encode_record(scope: str, key: str, texts: list[str], vectors: np.ndarray) -> bytes:
    meta = orjson.dumps({"scope": scope, "key": key, "texts": texts, "dim": int(vectors.shape[1])})
    return _LEN.pack(len(meta)) + meta + np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def decode_record(data: bytes) -> tuple[str, str, list[str], np.ndarray]:
    """Inverse of ``encode_record``; raises ``ValueError`` on anything malformed (no pickle involved)."""
    try:
        (n,) = _LEN.unpack_from(data)
        meta = orjson.loads(data[_LEN.size:_LEN.size + n])
        scope, key, texts, dim = meta["scope"], meta["key"], meta["texts"], int(meta["dim"])
        vectors = np.frombuffer(data[_LEN.size + n:], dtype="<f4")
        if not (isinstance(scope, str) and isinstance(key, str) and isinstance(texts, list)
                and all(isinstance(t, str) for t in texts) and texts and dim > 0
                and vectors.size == len(texts) * dim):
            raise ValueError("inconsistent record")
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed record: {exc}") from exc
    return scope, key, texts, vectors.reshape(len(texts), dim).astype(np.float32)


class SemanticCache(CachePlugin):
    Config = SemanticCacheConfig

    _store: DiskStore | MemoryStore | None = None
    _open_lock = threading.Lock()
    # get() embeds the request on an exact miss (milliseconds of CPU): a request handler should call
    # it off the event loop (exact stores answer in microseconds and are best called inline).
    lookup_may_block = True

    @property
    def shared_across_processes(self) -> bool:
        return self.config.store == "disk"

    # --- lifecycle ----------------------------------------------------------------------------
    def check(self, ctx: CheckContext) -> list[str]:
        if self.config.store != "disk":
            return []
        problem = folder_problem(self.config.directory)
        return [f"directory: {problem}"] if problem else []

    def _make_store(self) -> DiskStore | MemoryStore:
        c = self.config
        if c.store == "memory":
            return MemoryStore(c.max_entries, c.max_bytes, c.ttl_s)
        store = DiskStore(c.directory, c.size_limit, c.ttl_s, c.eviction_policy, c.statistics)
        store.open()
        return store

    def open(self) -> None:
        """Open the store, load the embedder and build the index (once per API process)."""
        with self._open_lock:
            if getattr(self, "_index", None) is not None:
                return
            if self._store is None:
                self._store = self._make_store()
            c = self.config
            self._embedder = TextEmbedder(c.model_path, c.max_tokens, c.threads)
            self._embedder.load()
            self._lock = threading.Lock()
            self._sync_lock = threading.Lock()
            self._pending: OrderedDict[str, np.ndarray] = OrderedDict()  # key -> vectors from get()
            self._own: set[int] = set()  # record numbers this process wrote (already indexed)
            self._synced = 0
            self._epoch: bytes | None = None
            self.hits = self.semantic_hits = self.misses = self.guard_rejections = self.not_eligible = 0
            self._index = VectorIndex(c.max_entries, self._embedder.dim)
            if isinstance(self._store, DiskStore):
                self._rebuild()

    def open_store(self) -> None:
        """Open only the exact store (``hydraserve cache stats|clear``: no embedder, no index)."""
        with self._open_lock:
            if self._store is None:
                self._store = self._make_store()

    def close(self) -> None:
        if isinstance(self._store, DiskStore):
            self._store.close()
        self._store = None
        self._index = None

    def _opened(self) -> None:
        if getattr(self, "_index", None) is None:
            self.open()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("_store", "_embedder", "_index", "_lock", "_sync_lock", "_pending"):
            state.pop(name, None)
        return state

    # --- lookups ------------------------------------------------------------------------------
    def _eligible(self, texts: list[str] | None) -> bool:
        return bool(texts) and len(texts) <= self.config.max_texts  # type: ignore[arg-type]

    def get(self, request: CacheRequest) -> CacheHit | None:
        self._opened()
        store = self._store
        value = store.get(request.key)
        if value is not None:
            self.hits += 1
            return CacheHit(value, "hit")
        texts = request.texts
        vectors = self._embedder.embed(texts) if self._eligible(texts) else None
        if vectors is None:
            self.not_eligible += 1
            self.misses += 1
            return None
        with self._lock:
            self._pending[request.key] = vectors
            while len(self._pending) > 256:
                self._pending.popitem(last=False)
        if isinstance(store, DiskStore):
            self._sync()
        sigs = [Signature.of(t) for t in texts] if self.config.guard else []  # type: ignore[union-attr]
        for cand in self._index.search(request.scope, vectors, self.config.threshold):
            if self.config.guard:
                if any(mismatch(a, b) for a, b in zip(sigs, cand.signatures, strict=True)):
                    self.guard_rejections += 1
                    continue
            value = store.get(cand.key, count=False)
            if value is None:  # evicted or expired since it was indexed
                self._index.remove(cand.key)
                continue
            self.semantic_hits += 1
            return CacheHit(value, "semantic-hit")
        self.misses += 1
        return None

    def put(self, request: CacheRequest, value: bytes) -> None:
        self._opened()
        store = self._store
        store.put(request.key, bytes(value))
        texts = request.texts
        if not self._eligible(texts) or request.key in self._index:
            return
        with self._lock:
            vectors = self._pending.pop(request.key, None)
        if vectors is None:
            vectors = self._embedder.embed(texts)  # type: ignore[arg-type]
            if vectors is None:
                return
        sigs = tuple(Signature.of(t) for t in texts)  # type: ignore[union-attr]
        self._index.add(request.key, request.scope, vectors, sigs)
        if isinstance(store, DiskStore):
            seq = store.incr(SEQ_KEY)
            if seq is not None:
                with self._lock:
                    self._own.add(seq)
                store.put(f"{RECORD_PREFIX}{seq:012d}", encode_record(request.scope, request.key,
                                                                      list(texts), vectors))  # type: ignore[arg-type]

    # --- the index and the shared store -----------------------------------------------------------
    def _rebuild(self) -> None:
        """Reload the index from the newest ``max_entries`` records of the disk store."""
        store: DiskStore = self._store  # type: ignore[assignment]
        self._index.clear()
        with self._lock:
            self._own.clear()
        self._epoch = store.add(EPOCH_KEY, uuid.uuid4().hex.encode())
        seq = store.get_int(SEQ_KEY)
        self._load(max(1, seq - self.config.max_entries + 1), seq)
        self._synced = seq

    def _load(self, first: int, last: int) -> None:
        store: DiskStore = self._store  # type: ignore[assignment]
        for n in range(first, last + 1):
            with self._lock:
                if n in self._own:
                    self._own.discard(n)
                    continue
            data = store.get(f"{RECORD_PREFIX}{n:012d}", count=False)
            if data is None:
                continue  # evicted, expired, or not written yet by its process
            try:
                scope, key, texts, vectors = decode_record(data)
                if vectors.shape[1] != self._index.dim:
                    raise ValueError(f"{vectors.shape[1]}-dim vectors; this embedder makes {self._index.dim}")
            except ValueError as exc:
                log.warning("semantic cache record %d is unusable (%s); skipped", n, exc)
                continue
            self._index.add(key, scope, vectors, tuple(Signature.of(t) for t in texts))

    def _sync(self) -> None:
        """Pick up records other API processes wrote since the last look (two indexed reads)."""
        with self._sync_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        store: DiskStore = self._store  # type: ignore[assignment]
        epoch = store.get(EPOCH_KEY, count=False)
        seq = store.get_int(SEQ_KEY)
        if epoch != self._epoch or seq < self._synced:
            self._rebuild()  # the store was cleared (or its counter evicted)
        elif seq > self._synced:
            first = max(self._synced + 1, seq - self.config.max_entries + 1)
            self._synced = seq
            self._load(first, seq)

    # --- admin --------------------------------------------------------------------------------
    def stats(self) -> dict:
        if self._store is None:
            self.open_store()
        store = self._store
        out: dict = {"plugin": "semantic", "threshold": self.config.threshold, "guard": self.config.guard,
                     "store": {"plugin": self.config.store, **store.stats()}}
        if getattr(self, "_index", None) is not None:
            out.update(hits=self.hits, semantic_hits=self.semantic_hits, misses=self.misses,
                       guard_rejections=self.guard_rejections, not_eligible=self.not_eligible,
                       index_entries=len(self._index))
        elif isinstance(store, DiskStore):
            internal = [k for k in store.keys() if k.startswith(RECORD_PREFIX)]
            out["store"]["entries"] = max(0, out["store"].get("entries", 0) - len(internal))
            out["embedding_records"] = sum(1 for k in internal if k[len(RECORD_PREFIX):].isdigit())
        return out

    def clear(self) -> int:
        if self._store is None:
            self.open_store()
        store = self._store
        if isinstance(store, DiskStore):
            internal = sum(1 for k in store.keys() if k.startswith(RECORD_PREFIX))
            removed = max(0, store.clear() - internal)
        else:
            removed = store.clear()
        if getattr(self, "_index", None) is not None:
            self._index.clear()
            if isinstance(store, DiskStore):
                self._rebuild()
        return removed


PLUGIN = SemanticCache

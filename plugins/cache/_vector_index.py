"""The semantic cache's in-memory index: a bounded ring of unit vectors, searched by dot product.

Each entry is one cached request: its response key, scope, and one unit vector per text. The first
text's vectors form one (capacity, dim) matrix, so a lookup is one matrix-vector product (about a
millisecond for 10k entries of 384 dims); entries of other scopes or another text count are masked
out, and only the few candidates above the threshold have their other texts compared. When full, the
oldest entry is overwritten (the exact store has its own eviction; a dangling entry is dropped the
first time its response is found missing).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from plugins.cache._guard import Signature


@dataclass
class Candidate:
    key: str
    similarity: float  # the lowest per-position cosine similarity
    signatures: tuple[Signature, ...]


class VectorIndex:
    def __init__(self, capacity: int, dim: int):
        self.capacity = capacity
        self.dim = dim
        self._first = np.zeros((capacity, dim), dtype=np.float32)
        self._scope = np.full(capacity, -1, dtype=np.int32)  # -1: empty slot
        self._count = np.zeros(capacity, dtype=np.int32)
        self._keys: list[str | None] = [None] * capacity
        self._rest: list[np.ndarray | None] = [None] * capacity  # vectors of texts 2..n
        self._sigs: list[tuple[Signature, ...]] = [()] * capacity
        self._slot_of: dict[str, int] = {}
        self._scope_ids: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: str) -> bool:
        return key in self._slot_of

    def add(self, key: str, scope: str, vectors: np.ndarray, signatures: tuple[Signature, ...]) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(signatures):
            raise ValueError(f"expected ({len(signatures)}, {self.dim}) vectors, got {vectors.shape}")
        with self._lock:
            if key in self._slot_of:
                return
            sid = self._scope_ids.setdefault(scope, len(self._scope_ids))
            slot = self._next
            self._next = (self._next + 1) % self.capacity
            self._free(slot)
            self._first[slot] = vectors[0]
            self._scope[slot] = sid
            self._count[slot] = len(vectors)
            self._keys[slot] = key
            self._rest[slot] = np.ascontiguousarray(vectors[1:]) if len(vectors) > 1 else None
            self._sigs[slot] = signatures
            self._slot_of[key] = slot

    def _free(self, slot: int) -> None:
        old = self._keys[slot]
        if old is not None:
            del self._slot_of[old]
        self._keys[slot] = None
        self._rest[slot] = None
        self._sigs[slot] = ()
        self._scope[slot] = -1

    def remove(self, key: str) -> None:
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._free(slot)

    def clear(self) -> None:
        with self._lock:
            for slot in list(self._slot_of.values()):
                self._free(slot)
            self._next = 0

    def search(self, scope: str, vectors: np.ndarray, threshold: float, limit: int = 8) -> list[Candidate]:
        """Entries of ``scope`` with as many texts whose every same-position similarity >= threshold."""
        with self._lock:
            sid = self._scope_ids.get(scope)
            if sid is None or not self._slot_of:
                return []
            sims = self._first @ vectors[0]
            mask = (self._scope == sid) & (self._count == len(vectors)) & (sims >= threshold)
            slots = np.flatnonzero(mask)
            found = []
            for slot in slots[np.argsort(-sims[slots])][: limit * 4]:
                low = float(sims[slot])
                rest = self._rest[slot]
                if rest is not None:
                    low = min(low, float(np.min(np.einsum("ij,ij->i", rest, vectors[1:]))))
                if low >= threshold:
                    found.append(Candidate(self._keys[slot], low, self._sigs[slot]))  # type: ignore[arg-type]
            found.sort(key=lambda c: -c.similarity)
            return found[:limit]

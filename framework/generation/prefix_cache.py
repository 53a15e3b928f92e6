"""Prefix (KV) cache: the KV of prompt prefixes a request shares with an earlier one is reused, block by block.

A block is ``block_size`` consecutive tokens; it is identified by its tokens *and* the block before it
(a chain, as in vLLM's automatic prefix caching), so a hit is only ever a whole prefix: block i
matches only if blocks 0..i-1 matched. Keys are the token tuples themselves, never a hash of them, so
two different prefixes can never share a block.

The engine's KV cache is one contiguous slot per sequence (the compiled decode reads slots through
views), so a hit is *copied* from this pool into the new sequence's slot instead of shared in place
as paged attention would: a copy of a 400-token prefix is a few MB of memory traffic, against a
prefill of the same tokens through every weight. The pool is allocated once, at its first store, at
``max_blocks`` blocks (``batching.prefix_cache_mb``), and never grows.

Eviction is least-recently-used among *leaf* blocks (no cached block continues them): evicting an
inner block would orphan its descendants, which could never match again. A hit touches its blocks
from the last to the first, so a chain's head stays more recent than its tail.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class KVBlockIO(Protocol):
    """What the cache needs from the model: copy a slot's KV positions out and back in."""

    def read_kv(self, slot: int, start: int, end: int) -> torch.Tensor:
        """The KV of positions ``start..end-1`` of ``slot``, as one tensor (any layout the model likes)."""
        ...

    def write_kv(self, slot: int, start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (as ``read_kv`` returned it) at positions ``start..`` of ``slot``."""
        ...


@dataclass(slots=True)
class _Block:
    key: tuple  # (parent row or -1, the block's token ids)
    parent: int  # the row of the block before it; -1 for a prompt's first block
    children: int = 0  # cached blocks continuing this one: a block with any is never evicted


class PrefixCache:
    def __init__(self, model: KVBlockIO, block_size: int, max_bytes: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_blocks: int | None = None  # known at the first store (the size of one block's KV)
        self._pool: torch.Tensor | None = None
        self._rows: dict[int, _Block] = {}  # pool row -> block
        self._by_key: dict[tuple, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # rows, least recently used first
        self._free: list[int] = []
        # Counters (tokens looked up and found, blocks evicted), exported by the worker.
        self.query_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self._rows)

    # --- lookup ------------------------------------------------------------------------------------
    def load(self, token_ids: list[int], slot: int, limit: int) -> int:
        """Copy the KV of the longest cached prefix of ``token_ids`` (at most ``limit`` tokens, whole
        blocks) into ``slot``; returns how many tokens it covers (0 on a miss)."""
        bs = self.block_size
        self.query_tokens += limit
        rows, parent = [], -1
        for i in range(limit // bs):
            row = self._by_key.get((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            if row is None:
                break
            rows.append(row)
            parent = row
        if not rows:
            return 0
        pool = self._pool
        for i, row in enumerate(rows):
            self.model.write_kv(slot, i * bs, pool[row])
        for row in reversed(rows):  # the head touched last: most recent, evicted after its tail
            self._lru.move_to_end(row)
        hit = len(rows) * bs
        self.hit_tokens += hit
        return hit

    # --- store -------------------------------------------------------------------------------------
    def store(self, token_ids: list[int], slot: int, num_cached: int) -> None:
        """Keep the whole blocks among the first ``num_cached`` positions of ``slot`` (whose tokens are
        ``token_ids[:num_cached]``); blocks already cached are only touched."""
        bs = self.block_size
        parent, touched = -1, []
        for i in range(num_cached // bs):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            row = self._by_key.get(key)
            if row is None:
                kv = self.model.read_kv(slot, i * bs, (i + 1) * bs)
                row = self._allocate(kv, exclude=parent)
                if row is None:  # full of blocks this chain depends on: keep what fits
                    break
                self._pool[row].copy_(kv)
                self._rows[row] = _Block(key, parent)
                self._by_key[key] = row
                if parent >= 0:
                    self._rows[parent].children += 1
                self._lru[row] = None
            touched.append(row)
            parent = row
        for row in reversed(touched):
            self._lru.move_to_end(row)

    def _allocate(self, kv: torch.Tensor, exclude: int) -> int | None:
        if self._pool is None:
            block_bytes = kv.numel() * kv.element_size()
            self.max_blocks = self.max_bytes // block_bytes
            if self.max_blocks < 1:
                return None
            self._pool = torch.empty((self.max_blocks, *kv.shape), dtype=kv.dtype, device=kv.device)
            self._free = list(range(self.max_blocks - 1, -1, -1))
        if self._free:
            return self._free.pop()
        return self._evict_one(exclude)

    def _evict_one(self, exclude: int) -> int | None:
        """Free the least recently used leaf block (never ``exclude``, the block a store continues)."""
        for row in self._lru:
            block = self._rows[row]
            if block.children == 0 and row != exclude:
                del self._lru[row]
                del self._rows[row]
                del self._by_key[block.key]
                if block.parent >= 0:
                    self._rows[block.parent].children -= 1
                self.evicted_blocks += 1
                return row
        return None

    def stats(self) -> dict[str, Any]:
        return {"blocks": self.num_blocks, "max_blocks": self.max_blocks, "query_tokens": self.query_tokens,
                "hit_tokens": self.hit_tokens, "evicted_blocks": self.evicted_blocks}

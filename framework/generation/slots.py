"""KV slot allocation: a slot is one sequence's row of the model's pre-allocated KV cache."""

from __future__ import annotations

import heapq


class SlotAllocator:
    """Lowest free slot first, so running sequences tend to occupy slots 0..B-1 and the forward can
    attend through a view of the cache instead of gathering rows."""

    def __init__(self, num_slots: int):
        self._free = list(range(num_slots))
        self._num = num_slots

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num - len(self._free)

"""``batching=none``: one request at a time, no added wait."""

from __future__ import annotations

from dataclasses import dataclass

from framework import BatchDecision, BatchingPlugin


@dataclass
class NoBatchingConfig:
    max_batch_size: int = 1

    def problems(self) -> list[tuple[str, str]]:
        if self.max_batch_size != 1:
            return [("max_batch_size", "batching=none runs one request at a time; use batching=dynamic "
                     "or batching=adaptive for larger batches")]
        return []


class NoBatching(BatchingPlugin):
    Config = NoBatchingConfig

    def max_request_items(self) -> int | None:
        return None

    def plan(self, pending_items: int, oldest_arrival: float, earliest_deadline: float, now: float) -> BatchDecision:
        # A single request may carry several items: it still runs alone, as one forward pass.
        return BatchDecision(run=pending_items > 0, size=1)


PLUGIN = NoBatching

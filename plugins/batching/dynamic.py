"""``batching=dynamic``: Triton-style dynamic batching with a bounded queue delay.

Rules, checked in this order at every ``plan`` call (each arrival and each ended wait):

1. Nothing pending: no batch (the loop blocks until an arrival).
2. ``max_batch_size`` items pending: run a full batch now.
3. Pending items reach a ``preferred_batch_sizes`` entry: run the largest preferred size that fits
   now (Triton does the same: a preferred batch is sent as soon as it can be formed).
4. The oldest request has waited ``max_delay_ms``: run what is pending.
5. Waiting any longer would make the earliest deadline unreachable (deadline minus the expected
   batch time, learned from ``record``): run now.
6. Otherwise wait until the oldest request's delay runs out (or the deadline bound, if sooner);
   an arrival wakes the loop earlier and the rules run again. Nothing polls.

The delay is paid at every load: at low load each request waits the whole ``max_delay_ms`` for
company that does not come. ``batching=adaptive`` removes that cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from framework import BatchDecision, BatchingPlugin
from plugins.batching._cost_model import CostModel


@dataclass
class DynamicBatchingConfig:
    max_batch_size: int = 32  # items per batch; also the most items one request may carry (413 above)
    max_delay_ms: float = 5.0  # how long the oldest pending request may wait for company
    preferred_batch_sizes: list[int] = field(default_factory=list)  # run at once when one can be formed

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.max_batch_size < 1:
            out.append(("max_batch_size", f"must be > 0, got {self.max_batch_size}"))
        if self.max_delay_ms < 0:
            out.append(("max_delay_ms", f"must be >= 0 (0 runs whatever is pending at once), "
                        f"got {self.max_delay_ms}"))
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= max(self.max_batch_size, 1)]
        if bad:
            out.append(("preferred_batch_sizes", f"every size must be within 1..max_batch_size "
                        f"({self.max_batch_size}); got {bad}"))
        return out


class DynamicBatching(BatchingPlugin):
    Config = DynamicBatchingConfig

    def __init__(self, config: DynamicBatchingConfig | None = None):
        super().__init__(config)
        self.cost = CostModel()
        self._preferred = sorted(set(self.config.preferred_batch_sizes), reverse=True)

    def plan(
        self, pending_items: int, oldest_arrival: float, earliest_deadline: float, now: float
    ) -> BatchDecision:
        if pending_items <= 0:
            return BatchDecision(run=False)
        limit = self.max_batch_size
        if pending_items >= limit:
            return BatchDecision(run=True, size=limit)
        for size in self._preferred:
            if size <= pending_items:
                return BatchDecision(run=True, size=size)
        delay_left = oldest_arrival + self.config.max_delay_ms / 1000.0 - now
        deadline_left = earliest_deadline - self.cost.predict(pending_items) - now
        wait = min(delay_left, deadline_left)
        if wait <= 0:
            return BatchDecision(run=True, size=pending_items)
        return BatchDecision(run=False, wait_s=wait)

    def record(self, batch_items: int, seconds: float) -> None:
        self.cost.record(batch_items, seconds)


PLUGIN = DynamicBatching

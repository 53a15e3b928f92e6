"""``batching=adaptive``: no added wait at low load, the largest batch that meets the target under backlog.

The batcher learns the batch cost ``t(b) = a + c*b`` online from ``record`` (``_cost_model.py``) and
the arrival rate ``r`` (items/s) from the pending counts it is shown (``_arrival_rate.py``). It is
called on each arrival and each ended wait; nothing polls. With ``n`` items pending and the oldest
request due at ``due = min(oldest_arrival + target_latency_ms, earliest_deadline)``:

1. ``n == 0``: no batch (the loop blocks until an arrival).
2. ``n >= max_batch_size``: run a full batch now.
3. **Wait for company only when it pays.** Waiting ``g`` seconds for one more item delays the ``n``
   pending by ``g`` and makes their batch one item dearer; not waiting makes the newcomer wait for
   the running batch and pay a batch of its own. Comparing the summed latencies of the two, waiting
   wins iff::

       g < t(1) / (n + 1) - (t(n+1) - t(n))        # = (a - n*c) / (n + 1) for a linear cost

   That break-even time is positive only when the fixed cost ``a`` per batch dominates the per-item
   cost ``c`` (a GPU launch), and it shrinks as ``n`` grows. The batcher waits when the expected
   gap to the next arrival, ``1/r``, is at most half the break-even time (so the arrival is likely
   to come in time), and then for at most ``min(break-even, max_wait_ms, due - t(n+1) - now)``.
   All waits in one episode (between two batches) share the deadline set by the first, so a wait
   that ends empty-handed is never renewed. On a CPU, where ``c`` dominates, and at low load, where
   ``1/r`` is long, the rule never fires: a lone request runs at once, exactly as ``batching=none``.
   Until a batch has been recorded, and while only one batch size has been seen, the cost model
   reads ``a = 0`` (all cost per item), so the batcher never waits on a guess.
4. **Run, sized to the target.** The batch takes the pending items (up to ``max_batch_size``) but no
   more than the largest ``b`` with ``now + t(b) <= due``, so the requests it holds still meet the
   target. Two exceptions keep it from making things worse: it never goes below the smallest size
   whose throughput ``b / t(b)`` keeps up with 1.25x the arrival rate (a batch too small to keep up
   only grows the backlog), and if even one item cannot meet ``due`` the oldest is already late, so
   it runs the largest batch allowed to drain the backlog fastest. The same drain applies when the
   backlog is at least ``DRAIN_DEPTH`` (3) target-sized batches deep: most of those requests miss the
   target whatever the batcher does, and target-sized batches would pay the per-batch cost again and
   again (measured: at saturation they held throughput to 0.84x of full batches).

How this differs from the prior art:

* Triton's dynamic batcher (``batching=dynamic``) either never waits (its default, like
  ``max_delay_ms: 0``: no company even when one more request would arrive in microseconds and the
  batch costs milliseconds) or holds every batch for up to ``max_queue_delay`` unless a preferred
  or maximum size is reached: at low load each request pays the whole window, and the window is
  one number for every load. It never sizes a batch to a latency target.
* BentoML's ``CorkDispatcher`` also fits ``t = a*n + b`` online, but its controller wakes every
  1 ms (``asyncio.sleep(0.001)``) to re-check the queue, learns in fixed warm-up phases of batch
  sizes 1, 2, 3, and its wait rule compares against the average past wait rather than a latency
  target. Here the worker loop is woken by arrivals only, the cost model is learned from whatever
  batches run (buckets by size, clipped outliers), and every wait is bounded by a break-even time
  derived from the cost model, by ``max_wait_ms`` and by the oldest request's target and deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework import BatchDecision, BatchingPlugin
from plugins.batching._arrival_rate import ArrivalRate, PendingTracker
from plugins.batching._cost_model import CostModel

# Wait only if the next arrival is expected within this fraction of the break-even time.
WAIT_FRACTION = 0.5
# Size a batch to keep up with this multiple of the arrival rate (room for bursts and noise).
HEADROOM = 1.25
# A backlog this many target-sized batches deep is drained with full batches (rule 4).
DRAIN_DEPTH = 3
# Shorter waits than this cost more in wake-ups than they can gain.
MIN_WAIT_S = 20e-6


@dataclass
class AdaptiveBatchingConfig:
    max_batch_size: int = 32  # items per batch; also the most items one request may carry (413 above)
    target_latency_ms: float = 50.0  # queue wait + batch time the oldest pending request should meet
    max_wait_ms: float = 2.0  # the longest any request is held back for company; 0 never waits
    arrival_window_s: float = 1.0  # memory of the arrival-rate estimate (time constant)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.max_batch_size < 1:
            out.append(("max_batch_size", f"must be > 0, got {self.max_batch_size}"))
        if self.target_latency_ms <= 0:
            out.append(("target_latency_ms", f"must be > 0, got {self.target_latency_ms}"))
        if self.max_wait_ms < 0:
            out.append(("max_wait_ms", f"must be >= 0 (0 never waits for company), got {self.max_wait_ms}"))
        if self.arrival_window_s <= 0:
            out.append(("arrival_window_s", f"must be > 0, got {self.arrival_window_s}"))
        return out


class AdaptiveBatching(BatchingPlugin):
    Config = AdaptiveBatchingConfig

    def __init__(self, config: AdaptiveBatchingConfig | None = None):
        super().__init__(config)
        self.cost = CostModel()
        self.arrivals = ArrivalRate(self.config.arrival_window_s)
        self._pending = PendingTracker()
        self._wait_until: float | None = None  # end of the current wait episode

    def plan(
        self, pending_items: int, oldest_arrival: float, earliest_deadline: float, now: float
    ) -> BatchDecision:
        self.arrivals.observe(now, self._pending.arrivals(pending_items))
        if pending_items <= 0:
            self._wait_until = None
            return BatchDecision(run=False)
        limit = self.max_batch_size
        due = min(oldest_arrival + self.config.target_latency_ms / 1000.0, earliest_deadline)
        if pending_items < limit:
            wait = self._wait_s(pending_items, due, now)
            if wait > MIN_WAIT_S:
                return BatchDecision(run=False, wait_s=wait)
        self._wait_until = None
        return BatchDecision(run=True, size=self._size(min(pending_items, limit), pending_items, due, now))

    def _wait_s(self, n: int, due: float, now: float) -> float:
        """How long waiting for one more item pays (rule 3); 0 to run now."""
        rate = self.arrivals.rate
        if self.config.max_wait_ms <= 0 or not self.cost.ready or rate <= 0:
            return 0.0
        t = self.cost.predict
        breakeven = t(1) / (n + 1) - (t(n + 1) - t(n))
        if breakeven <= 0 or 1.0 / rate > WAIT_FRACTION * breakeven:
            return 0.0
        wait = min(breakeven, self.config.max_wait_ms / 1000.0, due - t(n + 1) - now)
        if self._wait_until is not None:
            wait = min(wait, self._wait_until - now)
        elif wait > MIN_WAIT_S:
            self._wait_until = now + wait
        return wait

    def _size(self, cap: int, pending: int, due: float, now: float) -> int:
        """Items to run now (rule 4)."""
        fits = self.cost.largest_within(due - now, cap)
        if fits == 0 or pending >= DRAIN_DEPTH * fits:
            return cap  # already late, or a backlog the target cannot hold: drain at full efficiency
        keeps_up = self.cost.smallest_sustaining(HEADROOM * self.arrivals.rate, cap)
        return max(fits, keeps_up)

    def record(self, batch_items: int, seconds: float) -> None:
        self._pending.taken(batch_items)
        self.cost.record(batch_items, seconds)

    def state(self) -> dict:
        """Learned state, for logs and debugging."""
        return {**self.cost.state(), "arrival_rate_per_s": round(self.arrivals.rate, 2)}


PLUGIN = AdaptiveBatching

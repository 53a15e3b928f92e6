"""Arrival rate (items per second) estimated from the batcher's own calls, with exponential forgetting.

The batcher is never told about arrivals directly: it sees ``pending_items`` at each ``plan`` call
and the items each batch took in ``record``. ``PendingTracker`` turns that into "k items arrived
between the previous call and this one"; ``ArrivalRate`` turns those counts into a rate whose
memory fades with time constant ``window_s`` (both the counts and the elapsed time decay, so an idle
minute brings the estimate down to about zero and a burst raises it within a few arrivals).
"""

from __future__ import annotations

import math


class ArrivalRate:
    """Exponentially time-decayed count of arrivals divided by decayed elapsed time."""

    def __init__(self, window_s: float = 1.0):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._count = 0.0
        self._span = 0.0
        self._last: float | None = None

    def observe(self, now: float, arrived: int) -> None:
        """``arrived`` items came in since the previous observation (at ``now``)."""
        if self._last is None:
            # No interval to divide by yet; the first arrivals only start the clock.
            self._last = now
            return
        dt = max(0.0, now - self._last)
        self._last = now
        keep = math.exp(-dt / self.window_s)
        self._count = self._count * keep + max(0, arrived)
        self._span = self._span * keep + dt

    @property
    def rate(self) -> float:
        """Items per second; 0 until there is something to go on."""
        # A floor on the span keeps one burst seen in a single instant from reading as infinite.
        span = max(self._span, 0.05 * self.window_s)
        return self._count / span if self._count > 0 else 0.0


class PendingTracker:
    """Counts new arrivals from successive ``pending_items`` values and the batches taken."""

    def __init__(self) -> None:
        self._known = 0

    def arrivals(self, pending_items: int) -> int:
        """Items that arrived since the last call (requests dropped by the loop count as none)."""
        arrived = max(0, pending_items - self._known)
        self._known = max(0, pending_items)
        return arrived

    def taken(self, batch_items: int) -> None:
        """A batch of ``batch_items`` left the pending set."""
        self._known = max(0, self._known - batch_items)

"""Batch cost ``t(b) = a + c*b`` (seconds for a batch of ``b`` items), learned online.

The worker reports every batch it runs (``record(items, seconds)``). Samples are kept per batch
size as an exponentially weighted mean (a noisy neighbour or one slow batch moves a bucket by
``alpha`` of the difference, never more), then a weighted least-squares line is fitted through the
bucket means. Why buckets rather than a plain regression over samples: at low load almost every
batch has one item, and a raw fit would let thousands of size-1 samples drown the few large
batches that carry all the information about the slope.

Robustness rules, each for a failure seen in practice:

* A sample far from what is expected (more than ``clip`` times above or below the bucket mean, or
  the fitted line for a size not seen yet) is clipped first: the first batch of a new shape may
  include a compilation that takes seconds, and one GC pause must not teach the batcher that
  batches are slow.
* Buckets that stop being seen lose weight (``decay`` per recorded batch), so the line follows a
  machine whose speed changes (thermal throttling, a neighbour process).
* The line is constrained to ``a >= 0`` and ``c >= 0``. With a single batch size seen the fit is
  through the origin (``a = 0``: all cost per item). That is the pessimistic reading for batching:
  it never suggests waiting for company until larger batches have proven cheaper per item.

Until the first sample the model predicts ``prior`` (``(a, c)``, default ``(0, 0)``: unknown, so the
batcher behaves greedily and adds no wait).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Bucket:
    mean: float
    weight: float
    last_seen: int  # index of the record that last updated it


class CostModel:
    """Online estimate of batch time against batch size."""

    def __init__(
        self,
        alpha: float = 0.2,
        decay: float = 0.995,
        max_weight: float = 50.0,
        clip: float = 4.0,
        prior: tuple[float, float] = (0.0, 0.0),
    ):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.alpha = alpha
        self.decay = decay
        self.max_weight = max_weight
        self.clip = clip
        self._buckets: dict[int, _Bucket] = {}
        self._records = 0
        self._a, self._c = max(0.0, prior[0]), max(0.0, prior[1])
        self._dirty = False

    # ------------------------------------------------------------------------------------ learning
    def record(self, batch_items: int, seconds: float) -> None:
        """Learn from one batch of ``batch_items`` items that took ``seconds``."""
        if batch_items < 1 or not math.isfinite(seconds) or seconds < 0:
            return  # a failed or empty batch says nothing about cost
        self._records += 1
        bucket = self._buckets.get(batch_items)
        if bucket is None:
            if self._buckets:
                expected = self.predict(batch_items)
                if expected > 0:
                    seconds = min(max(seconds, expected / self.clip), expected * self.clip)
            self._buckets[batch_items] = _Bucket(seconds, 1.0, self._records)
        else:
            weight = self._weight(bucket)
            seconds = min(max(seconds, bucket.mean / self.clip), bucket.mean * self.clip)
            bucket.mean += self.alpha * (seconds - bucket.mean)
            bucket.weight = min(weight + 1.0, self.max_weight)
            bucket.last_seen = self._records
        self._dirty = True

    def _weight(self, bucket: _Bucket) -> float:
        return bucket.weight * self.decay ** (self._records - bucket.last_seen)

    def _fit(self) -> None:
        sw = sb = sbb = sm = sbm = 0.0
        for size, bucket in self._buckets.items():
            w = self._weight(bucket)
            sw += w
            sb += w * size
            sbb += w * size * size
            sm += w * bucket.mean
            sbm += w * size * bucket.mean
        det = sw * sbb - sb * sb
        if det <= 1e-12 * max(sw * sbb, 1e-300):
            a, c = 0.0, sbm / sbb  # one batch size seen: all cost per item (pessimistic)
        else:
            c = (sw * sbm - sb * sm) / det
            a = (sm - c * sb) / sw
            if c < 0:  # larger batches measured cheaper: noise; flat cost
                a, c = sm / sw, 0.0
            elif a < 0:  # negative fixed cost: fit through the origin instead
                a, c = 0.0, sbm / sbb
        self._a, self._c = a, c
        self._dirty = False

    # ---------------------------------------------------------------------------------- prediction
    @property
    def samples(self) -> int:
        """Batches recorded so far."""
        return self._records

    @property
    def ready(self) -> bool:
        return self._records > 0

    @property
    def intercept(self) -> float:
        """``a``: seconds every batch costs regardless of its size."""
        if self._dirty:
            self._fit()
        return self._a

    @property
    def slope(self) -> float:
        """``c``: seconds each item adds to a batch."""
        if self._dirty:
            self._fit()
        return self._c

    def predict(self, batch_items: int) -> float:
        """Expected seconds for a batch of ``batch_items`` items (0 for an empty batch)."""
        if batch_items <= 0:
            return 0.0
        return self.intercept + self.slope * batch_items

    def largest_within(self, seconds: float, limit: int) -> int:
        """The largest ``b`` in ``0..limit`` with ``predict(b) <= seconds``."""
        a, c = self.intercept, self.slope
        if seconds < a + c:
            return 0
        if c <= 0:
            return limit
        return max(0, min(limit, int(math.floor((seconds - a) / c + 1e-9))))

    def smallest_sustaining(self, items_per_s: float, limit: int) -> int:
        """The smallest ``b`` in ``1..limit`` whose throughput ``b / t(b)`` reaches ``items_per_s``."""
        a, c = self.intercept, self.slope
        if items_per_s <= 0 or a <= 0:
            return 1
        if items_per_s * c >= 1.0:
            return limit  # even infinite batches cannot keep up: be as efficient as allowed
        need = items_per_s * a / (1.0 - items_per_s * c)
        return max(1, min(limit, int(math.ceil(need - 1e-9))))

    def state(self) -> dict:
        """For logs and ``/info``: the fitted line in milliseconds."""
        return {
            "intercept_ms": round(self.intercept * 1e3, 4),
            "per_item_ms": round(self.slope * 1e3, 4),
            "batches": self._records,
        }

"""Per-stage measurements: latency histograms, throughput, goodput, errors and cache hits.

Latency is recorded twice per request (HdrHistogram, microseconds, 3 significant digits):

* ``latency``: from the request's *intended* send time (its slot in the open-loop schedule) to the
  last byte of the response. This is the number a user sees; it includes any time the request
  waited because the server (or a full connection pool) was slow, so queueing is never hidden
  (no coordinated omission).
* ``service``: from the moment the request was actually written to the socket. The gap between the
  two tells whether the client kept up (``send_lag``) and how much queueing the server caused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a histogram is made: rebuilding a sweep's report needs no bench extra
    from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_MAX_US = 3_600_000_000  # one hour: anything slower is clamped (the request timeout is far lower)
OK_STATUSES = range(200, 300)
CACHE_KINDS = ("hit", "semantic-hit", "miss")


def _histogram() -> HdrHistogram:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, _MAX_US, 3)


def _record(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(max(int(seconds * 1e6), 1), _MAX_US))


def _summary_ms(hist: HdrHistogram) -> dict:
    if hist.get_total_count() == 0:
        return {f"p{int(p)}": None for p in PERCENTILES} | {"max": None, "mean": None}
    out = {f"p{int(p)}": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    out["max"] = hist.get_max_value() / 1000.0
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3)
    return out


@dataclass
class StageStats:
    """Everything measured for one offered rate. ``record`` is called once per finished request."""

    offered_rate: float  # requests/s the schedule asked for
    slo_ms: float
    arrival: str = "constant"
    planned: int = 0  # requests in the schedule
    duration_s: float = 0.0  # how long the schedule lasts
    latency: HdrHistogram = field(default_factory=_histogram)
    service: HdrHistogram = field(default_factory=_histogram)
    send_lag: HdrHistogram = field(default_factory=_histogram)
    statuses: Counter = field(default_factory=Counter)  # "200", "503", "timeout", "connect_error"
    cache: Counter = field(default_factory=Counter)  # X-Cache header values of 2xx answers
    ok: int = 0
    good: int = 0  # 2xx and latency <= SLO
    first_intended: float | None = None
    last_intended: float | None = None
    first_sent: float | None = None
    last_sent: float | None = None
    last_done: float | None = None
    issued: int = 0  # requests whose intended send time came (set by the load generator)
    finished: int = 0  # answered, failed or timed out: recorded here
    cancelled: int = 0  # issued but unfinished when the run was stopped or the drain timed out

    def record(self, intended: float, sent: float, done: float, status: int | str,
               cache: str | None = None) -> None:
        self.finished += 1
        self.first_intended = intended if self.first_intended is None else min(self.first_intended, intended)
        self.last_intended = intended if self.last_intended is None else max(self.last_intended, intended)
        self.first_sent = sent if self.first_sent is None else min(self.first_sent, sent)
        self.last_sent = sent if self.last_sent is None else max(self.last_sent, sent)
        self.last_done = done if self.last_done is None else max(self.last_done, done)
        self.statuses[str(status)] += 1
        _record(self.send_lag, max(sent - intended, 0.0))
        if isinstance(status, int) and status in OK_STATUSES:
            latency = done - intended
            _record(self.latency, latency)
            _record(self.service, done - sent)
            self.ok += 1
            if latency * 1000.0 <= self.slo_ms:
                self.good += 1
            if cache:
                self.cache[cache.strip().lower()] += 1

    # ------------------------------------------------------------------------------------ summary
    def window_s(self) -> float:
        """From the first intended send to the last answer: the time the measured work took."""
        if self.first_intended is None or self.last_done is None:
            return 0.0
        measured = self.last_done - self.first_intended
        if self.finished >= self.planned > 0:  # the whole schedule ran: it lasted at least its duration
            measured = max(measured, self.duration_s)
        return max(measured, 1e-9)

    def achieved_send_rate(self) -> float | None:
        """Requests/s actually written, first to last send (what the generator really offered)."""
        if self.finished < 2 or self.first_sent is None or self.last_sent is None:
            return None
        span = self.last_sent - self.first_sent
        return (self.finished - 1) / span if span > 0 else None

    def cache_hit_ratio(self) -> float | None:
        seen = sum(self.cache.values())
        if not seen:
            return None
        return (self.cache["hit"] + self.cache["semantic-hit"]) / seen

    def summary(self) -> dict:
        window = self.window_s()
        errors = {k: v for k, v in sorted(self.statuses.items())
                  if not (k.isdigit() and int(k) in OK_STATUSES)}
        if self.cancelled:
            errors["cancelled"] = self.cancelled
        issued = max(self.issued, self.finished)
        return {
            "offered_rate": self.offered_rate,
            "arrival": self.arrival,
            "achieved_send_rate": _round(self.achieved_send_rate()),
            "planned": self.planned,
            "sent": issued,
            "finished": self.finished,
            "ok": self.ok,
            "cancelled": self.cancelled,
            "window_s": round(window, 3),
            "throughput": round(self.ok / window, 3) if window else 0.0,
            "slo_ms": self.slo_ms,
            "goodput": round(self.good / window, 3) if window else 0.0,
            "slo_attainment": round(self.good / issued, 4) if issued else None,
            "latency_ms": _summary_ms(self.latency),
            "service_ms": _summary_ms(self.service),
            "send_lag_ms": _summary_ms(self.send_lag),
            "statuses": dict(sorted(self.statuses.items())),
            "errors": errors,
            "error_rate": round(sum(errors.values()) / issued, 4) if issued else 0.0,
            "cache": {k: self.cache.get(k, 0) for k in CACHE_KINDS}
            | {k: v for k, v in self.cache.items() if k not in CACHE_KINDS},
            "cache_hit_ratio": _round(self.cache_hit_ratio(), 4),
            "histogram": self.latency.encode().decode() if self.latency.get_total_count() else None,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def best_stage(stages: list[dict]) -> dict | None:
    """The stage with the highest goodput (ties: the lower offered rate): what a config sustains."""
    measured = [s for s in stages if s.get("sent")]
    if not measured:
        return None
    return max(measured, key=lambda s: (s.get("goodput") or 0.0, -(s.get("offered_rate") or 0.0)))

"""W3C trace context on the request path: parse and write ``traceparent``, make ids, sample.

Ids stay lowercase hex strings from the header to the exported line, so the hot path never converts
between ints and text. Parsing follows the W3C Trace Context rules the OpenTelemetry propagator
applies (version ``ff`` and all-zero ids are invalid; a future version may carry extra fields),
at a fraction of its cost: one regular expression, no setter/getter indirection, no Context objects.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["ZERO_SPAN_ID", "ZERO_TRACE_ID", "SpanRef", "new_span_id", "new_trace_id",
           "parse_raw_traceparent", "parse_traceparent", "ratio_sampled"]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
ZERO_TRACE_ID = "0" * 32  # all zeros: the invalid ids
ZERO_SPAN_ID = "0" * 16
_getrandbits = random.getrandbits


class SpanRef:
    """A span's identity, enough to parent a child: what a ``traceparent`` header carries.

    ``remote`` is true for a parent that came from outside this process (a client's header, or the
    API process's span as seen by the worker).
    """

    __slots__ = ("trace_id", "span_id", "sampled", "trace_state", "remote")

    def __init__(self, trace_id: str, span_id: str, sampled: bool, trace_state: str | None = None,
                 remote: bool = False) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.trace_state = trace_state
        self.remote = remote

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def carrier(self) -> dict[str, str]:
        """The headers that continue this trace in another process (put them in a queued message)."""
        out = {"traceparent": self.traceparent()}
        if self.trace_state:
            out["tracestate"] = self.trace_state
        return out

    def __repr__(self) -> str:
        return f"SpanRef({self.traceparent()!r})"


# int.to_bytes(...).hex() is about 4x faster than formatting the int as hex (0.3 vs 1.1 µs here).
def new_trace_id() -> str:
    return (_getrandbits(128) or 1).to_bytes(16, "big").hex()  # all zeros is the invalid id


def new_span_id() -> str:
    return (_getrandbits(64) or 1).to_bytes(8, "big").hex()



def parse_traceparent(carrier: Mapping[str, Any] | None) -> SpanRef | None:
    """The remote parent in ``carrier`` (a dict or request headers), or ``None`` if absent or invalid.

    A malformed header is ignored, never an error: the request starts a new trace instead.
    """
    if not carrier:
        return None
    header = carrier.get("traceparent")
    if not header:
        return None
    return _parse(header, carrier.get("tracestate"))


def parse_raw_traceparent(header: bytes, state: bytes | None) -> SpanRef | None:
    """:func:`parse_traceparent` for header values as an ASGI scope holds them (bytes)."""
    return _parse(header.decode("latin-1"), state.decode("latin-1") if state else None)


def _parse(header: str, state: str | None) -> SpanRef | None:
    m = _TRACEPARENT.fullmatch(header.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID:
        return None
    return SpanRef(trace_id, span_id, bool(int(flags, 16) & 1), state or None, True)


def ratio_sampled(trace_id: str, ratio: float) -> bool:
    """The decision of OpenTelemetry's ``TraceIdRatioBased``: the low 64 bits of the id under a bound.

    Deterministic in the trace id, so every process (and any other OpenTelemetry SDK configured with
    the same ratio) reaches the same decision for the same trace.
    """
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    return int(trace_id[16:], 16) < round(ratio * (1 << 64))

"""A finished span as a plain tuple, and its two export forms: a JSON-lines dict and an SDK span.

The request path only builds the tuple (a few hundred nanoseconds); turning it into a dict or an
OpenTelemetry ``ReadableSpan`` happens later, in the exporting thread, a chunk at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["SpanRecord", "readable_span", "record_dict", "sdk_span_dict"]

class SpanRecord(NamedTuple):
    """A finished span. A tuple subclass: the request path builds it with ``tuple.__new__`` (the
    generated ``__new__`` checks arguments), so it costs what a tuple costs."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    parent_remote: bool
    kind: str  # SERVER, INTERNAL, ...: an OpenTelemetry SpanKind name
    start_ns: int
    end_ns: int
    attributes: dict | None
    status: str  # UNSET or ERROR
    description: str | None
    events: tuple  # ((name, time_ns, attributes), ...)
    trace_state: str | None


_STATUS_NAMES = {c: c.name for c in trace.StatusCode}
_KIND_NAMES = {k: k.name for k in trace.SpanKind}
_EMPTY: dict = {}
_NONE: tuple = ()
_UNSET = {"code": "UNSET", "description": None}


def record_dict(r: SpanRecord) -> dict[str, Any]:
    """One span of the file exporter's format (what ``hydraserve traces`` reads)."""
    return {
        "trace_id": r.trace_id,
        "span_id": r.span_id,
        "parent_span_id": r.parent_span_id,
        "parent_remote": r.parent_remote,
        "name": r.name,
        "kind": r.kind,
        "start_ns": r.start_ns,
        "end_ns": r.end_ns,
        "attributes": r.attributes or _EMPTY,
        "status": {"code": r.status, "description": r.description} if r.status != "UNSET" else _UNSET,
        "events": [{"name": n, "time_ns": t, "attributes": a} for n, t, a in r.events] if r.events else _NONE,
    }


def sdk_span_dict(span: ReadableSpan) -> dict[str, Any]:
    """The same line for a span made through the OpenTelemetry SDK (``tracing.tracer()``)."""
    ctx = span.context
    parent = span.parent
    status = span.status
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "parent_remote": parent is not None and parent.is_remote,
        "name": span.name,
        "kind": _KIND_NAMES[span.kind],
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or _EMPTY),
        "status": {"code": _STATUS_NAMES[status.status_code], "description": status.description},
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or _EMPTY)}
                   for e in span.events],
        "links": [{"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}",
                   "attributes": dict(link.attributes or _EMPTY)} for link in span.links],
    }


def readable_span(r: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The SDK's span for a record, for the SDK's exporters (OTLP, console, in-memory)."""
    state = trace.TraceState.from_header([r.trace_state]) if r.trace_state else None
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    trace_id = int(r.trace_id, 16)
    parent = None
    if r.parent_span_id is not None:
        parent = trace.SpanContext(trace_id, int(r.parent_span_id, 16), r.parent_remote, flags, state)
    status = trace.Status(trace.StatusCode[r.status], r.description)
    return ReadableSpan(
        name=r.name,
        context=trace.SpanContext(trace_id, int(r.span_id, 16), False, flags, state),
        parent=parent,
        resource=resource,
        attributes=r.attributes or {},
        events=tuple(Event(n, a, timestamp=t) for n, t, a in r.events),
        kind=trace.SpanKind[r.kind],
        status=status,
        start_time=r.start_ns,
        end_time=r.end_ns,
        instrumentation_scope=scope,
    )

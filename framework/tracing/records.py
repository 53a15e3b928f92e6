"""Finished spans as plain tuples, and what they become: rows of the file, dicts, SDK spans.

The request path only builds a tuple (a few hundred nanoseconds). A :class:`SpanRecord` is one span;
a :class:`TreeRecord` is several spans of one trace under one parent (the worker's five spans of a
request), kept as measured and expanded into spans (:func:`expand_tree`) only where spans are
needed: by an SDK exporter (OTLP, console) or by a reader of the file. The file stores both as
positional JSON arrays (see ``export.py``), which orjson writes without any Python code per span.

The queue holds them as plain tuples of these shapes, told apart by length (a row has
:data:`ROW_LEN` fields, a tree fewer): orjson writes a plain tuple natively, while a named tuple
would cost a call to its ``default`` hook per record. The named tuples name the fields, for the
code that reads them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["NO_EVENTS", "ROW_LEN", "SPAN_FIELDS", "TREE_FIELDS", "TREE_SPAN_FIELDS", "SpanRecord",
           "TreeRecord", "error_fields", "exception_attributes", "expand_tree", "readable_span", "record_dict",
           "sdk_span_dict"]


class SpanRecord(NamedTuple):
    """A finished span's fields. The request path queues them as a plain tuple (see above);
    ``SpanRecord._make(row)`` names them again where they are read."""

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


class TreeRecord(NamedTuple):
    """Finished spans of one trace under one parent, as measured (one queue entry for all of them).

    ``spans`` holds ``(name, start_ns, end_ns, attributes, parent_index, error)`` entries:
    ``parent_index`` is an earlier entry's position, or -1 for the parent span itself; ``error`` is
    ``None``, a description, or the exception (or, read back from a file, its attributes). Span ``i``'s
    id is ``id_base + i`` (mod 2**64, never 0): one random draw for the whole tree. ``spans`` may
    also be those entries already serialized as one JSON array (bytes: how a worker sends them; an
    ``orjson.Fragment`` of them in a process whose exporter is the file, which writes them as they are).
    """

    trace_id: str
    trace_state: str | None
    parent_span_id: str
    parent_remote: bool
    id_base: int  # a random 64-bit number
    spans: list | tuple | bytes | orjson.Fragment


SPAN_FIELDS = SpanRecord._fields
TREE_FIELDS = TreeRecord._fields
ROW_LEN = len(SPAN_FIELDS)  # a queued plain tuple of this length is a SpanRecord, a shorter one a TreeRecord
TREE_SPAN_FIELDS = ("name", "start_ns", "end_ns", "attributes", "parent_index", "error")
_MASK64 = (1 << 64) - 1
NO_EVENTS: tuple = ()  # the events of a span that has none (shared: tuples cannot change)
_UNSET_FIELDS = ("UNSET", None, NO_EVENTS)


def exception_attributes(error: BaseException) -> dict[str, str]:
    """The attributes of the ``exception`` event the SDK's ``span.record_exception`` would add."""
    return {"exception.type": type(error).__qualname__, "exception.message": str(error)}


def error_fields(error: Any, end_ns: int) -> tuple[str, str | None, tuple]:
    """(status, description, events) of a span that failed with ``error``: ``None`` (it did not), a
    description, an exception (which also becomes an ``exception`` event), or such an event's
    attributes read back from a file."""
    if error is None:
        return _UNSET_FIELDS
    if isinstance(error, BaseException):
        error = exception_attributes(error)
    if isinstance(error, dict):
        return "ERROR", str(error.get("exception.message", "")), (("exception", end_ns, error),)
    return "ERROR", str(error), NO_EVENTS


def tree_span_id(id_base: int, index: int) -> str:
    return (((id_base + index) & _MASK64) or 1).to_bytes(8, "big").hex()


def expand_tree(trace_id: str, trace_state: str | None, parent_span_id: str, parent_remote: bool, id_base: int,
                spans: list | tuple | bytes) -> list[SpanRecord]:
    """The spans of a :class:`TreeRecord` (its fields, or the same values read back from a file)."""
    if type(spans) is bytes:
        spans = orjson.loads(spans)
    ids = [tree_span_id(id_base, i) for i in range(len(spans))]
    out = []
    for i, (name, start_ns, end_ns, attributes, parent_index, error) in enumerate(spans):
        status, description, events = error_fields(error, end_ns)
        if parent_index < 0:
            parent_id, remote = parent_span_id, parent_remote
        else:
            parent_id, remote = ids[parent_index], False
        out.append(SpanRecord(name, trace_id, ids[i], parent_id, remote, "INTERNAL", start_ns, end_ns, attributes,
                              status, description, events, trace_state))
    return out


_STATUS_NAMES = {c: c.name for c in trace.StatusCode}
_KIND_NAMES = {k: k.name for k in trace.SpanKind}
_EMPTY: dict = {}
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
        "events": [{"name": n, "time_ns": t, "attributes": a} for n, t, a in r.events] if r.events else NO_EVENTS,
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

"""The one record shape: a finished span is OTLP/JSON bytes from the moment it ends.

Each queued entry is the JSON of one or more OTLP ``Span`` objects, with the OTLP JSON encoding's
names and rules (camelCase keys, hex ids, 64-bit integers as strings, enums as numbers, attributes
as ``{"key", "value"}`` lists), so exporting a chunk is joining its entries inside a ``TracesData``:
the line of ``traces.jsonl`` and the body of an OTLP/HTTP POST are the same bytes.

A worker encodes a batch's spans once (:func:`encode_spans`, :class:`SpanTree`) with two
placeholders, ``%(t)s`` for the trace id and ``%(p)s`` for the request's span where it is the
parent, because the requests sharing a batch belong to different traces; each sampled request's
copy is then filled in with one bytes ``%`` formatting (:func:`fill`) instead of re-encoding it;
every other ``%`` in them is doubled.
The request path builds its bytes with ``%`` formatting too: on a 2-core machine a dict per span
and an ``orjson.dumps`` of it cost several times more per ``echo`` request.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = ["KIND", "Encoded", "Slot", "SpanTree", "attributes", "attributes_json", "child_span", "encode_spans",
           "error_fields", "exception_attributes", "fill", "sdk_span", "span_json"]

KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}  # OTLP SpanKind numbers
STATUS_ERROR = 2
_getrandbits = random.getrandbits


def _value(v: Any) -> dict:
    """An OTLP ``AnyValue``: bool before int (a bool is an int in Python); 64-bit ints as strings."""
    t = type(v)
    if t is str:
        return {"stringValue": v}
    if t is bool:
        return {"boolValue": v}
    if t is int:  # OTLP integers are 64-bit: a larger one is kept as text rather than refused by collectors
        return {"intValue": str(v)} if -(1 << 63) <= v < (1 << 63) else {"stringValue": str(v)}
    if t is float:
        # JSON has no NaN or infinity; the OTLP JSON encoding writes them as these strings.
        return {"doubleValue": v if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    if isinstance(v, Mapping):
        return {"kvlistValue": {"values": attributes(v)}}
    return {"stringValue": str(v)}


def attributes(attrs: Mapping[str, Any] | None) -> list[dict]:
    """``attrs`` as an OTLP ``KeyValue`` list (``None`` values are left out, as the SDK does)."""
    if not attrs:
        return []
    return [{"key": str(k), "value": _value(v)} for k, v in attrs.items() if v is not None]


class Encoded(bytes):
    """Attributes already encoded (:func:`attributes_json`): a JSON ``KeyValue`` list, ``%`` doubled."""


_keys: dict[str, bytes] = {}


def attributes_json(attrs: Mapping[str, Any]) -> Encoded:
    """``attrs`` encoded (``%`` doubled): strings and integers straight to bytes, as a worker's batch
    attributes are, each key's JSON kept (building the ``KeyValue`` dicts cost twice as much)."""
    parts = []
    for k, v in attrs.items():
        key = _keys.get(k)
        if key is None:
            if len(_keys) > 1024:
                _keys.clear()
            key = _keys[k] = orjson.dumps(str(k)).replace(b"%", b"%%")
        t = type(v)
        if t is str:
            parts.append(b'{"key":%s,"value":{"stringValue":%s}}' % (key, orjson.dumps(v).replace(b"%", b"%%")))
        elif t is int and -(1 << 63) <= v < (1 << 63):
            parts.append(b'{"key":%s,"value":{"intValue":"%d"}}' % (key, v))
        elif v is not None:
            parts.append(b'{"key":%s,"value":%s}' % (key, orjson.dumps(_value(v)).replace(b"%", b"%%")))
    return Encoded(b"[%s]" % b",".join(parts))


def exception_attributes(error: BaseException) -> dict[str, str]:
    """The attributes of the ``exception`` event the SDK's ``span.record_exception`` would add."""
    return {"exception.type": type(error).__qualname__, "exception.message": str(error)}


def error_fields(span: dict, error: Any, end_ns: int) -> dict:
    """Mark ``span`` failed with ``error``: a description, an exception, or an exception's attributes
    (:func:`exception_attributes`, as a worker sends them); the last two add an ``exception`` event."""
    if isinstance(error, BaseException):
        error = exception_attributes(error)
    if isinstance(error, Mapping):
        span["status"] = {"code": STATUS_ERROR, "message": str(error.get("exception.message", ""))}
        span["events"] = [{"timeUnixNano": str(end_ns), "name": "exception", "attributes": attributes(error)}]
    else:
        span["status"] = {"code": STATUS_ERROR, "message": str(error)}
    return span


def span_json(trace_id: str, sid: str, parent_id: str | None, name: str, kind: int, start_ns: int, end_ns: int,
              attrs: Any = None, error: Any = None, trace_state: str | None = None) -> dict:
    """One finished span as a dict of the OTLP JSON encoding (``attrs``: a mapping or a ``KeyValue`` list)."""
    span = {"traceId": trace_id, "spanId": sid, "name": name, "kind": kind,
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(end_ns)}
    if parent_id:
        span["parentSpanId"] = parent_id
    if trace_state:
        span["traceState"] = trace_state
    if attrs:
        span["attributes"] = attrs if type(attrs) is list else attributes(attrs)
    if error is not None:
        error_fields(span, error, end_ns)
    return span


_INDEX = [b"%02x" % i for i in range(256)]  # a span's id is its tree's random prefix and its index
_WORKER_SPAN = b'{"traceId":"%%(t)s","spanId":"%s%s","parentSpanId":"%s","kind":1,"startTimeUnixNano":"%d",' \
               b'"endTimeUnixNano":"%d","name":%s}'
_names: dict[str, bytes] = {}


def _name_json(name: str) -> bytes:
    encoded = _names.get(name)
    if encoded is None:
        if len(_names) > 1024:  # names are a handful; a caller making them per span stays bounded
            _names.clear()
        encoded = _names[name] = orjson.dumps(name).replace(b"%", b"%%")
    return encoded


def encode_spans(entries: Sequence[tuple]) -> bytes:
    """A worker's spans of one request (or batch): a JSON array of OTLP spans for :func:`fill`.

    Each entry is ``(name, start_ns, end_ns, attributes, parent_index, error)``: ``parent_index`` is
    an earlier entry's position, or -1 for the request's span (the parent the API process fills in);
    ``attributes`` a mapping or :func:`attributes_json`; ``error`` ``None``, a description, an
    exception or its attributes. The ids are this call's own: unique within each trace the spans
    join, which is all OTLP asks of a span id. Written for a worker's few spans per batch: one ``%``
    formatting per span, names encoded once.
    """
    if len(entries) > len(_INDEX):
        raise ValueError(f"encode_spans: at most {len(_INDEX)} spans at once, got {len(entries)}")
    prefix = b"%014x" % (_getrandbits(56) or 1)  # never all zeros, the invalid id
    names, index, parts, i = _names, _INDEX, [], 0
    for name, start_ns, end_ns, attrs, parent, error in entries:
        head = names.get(name) or _name_json(name)
        if attrs:
            head += b',"attributes":' + (attrs if type(attrs) is Encoded else attributes_json(attrs))
        if error is not None:
            head += b"," + orjson.dumps(error_fields({}, error, end_ns))[1:-1].replace(b"%", b"%%")
        parts.append(_WORKER_SPAN % (prefix, index[i], b"%(p)s" if parent < 0 else prefix + index[parent],
                                     start_ns, end_ns, head))
        i += 1
    return b"[%s]" % b",".join(parts)


class Slot:
    """In :class:`SpanTree`'s attributes: an integer given at each encode (``prefix``: a string
    attribute, the prefix and the integer, such as a batch id)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix


def _literal(encoded: bytes) -> bytes:
    # Text written into a SpanTree template: once through its encode's % and once through fill's.
    return encoded.replace(b"%", b"%%%%")


def _attribute_template(attrs: Mapping[str, Any]) -> tuple[bytes, int]:
    """``attrs`` as a template (``Slot`` values become ``%d``) and how many values it takes."""
    parts, slots = [], 0
    for k, v in attrs.items():
        key = _literal(orjson.dumps(str(k)))
        if isinstance(v, Slot):
            slots += 1
            value = b'{"intValue":"%d"}' if v.prefix is None else \
                b'{"stringValue":"' + _literal(orjson.dumps(v.prefix)[1:-1]) + b'%d"}'
        elif v is None:
            continue
        else:
            value = _literal(orjson.dumps(_value(v)))
        parts.append(b'{"key":%s,"value":%s}' % (key, value))
    return b',"attributes":[%s]' % b",".join(parts) if parts else b"", slots


class SpanTree:
    """A fixed tree of spans encoded by one ``%`` formatting per call: :func:`encode_spans`' output
    for the same spans, with what does not change between calls (names, attributes, ids' suffixes,
    parents, key order) written into a template once. For the spans a worker sends with every batch
    (a dict of attributes and a loop over the spans cost three times as much per batch).

    ``entries``: ``(name, parent_index, attributes)`` in order; ``parent_index`` -1 is the request's
    span (filled in by :func:`fill`); ``attributes`` a mapping whose :class:`Slot` values are given
    per call. :meth:`encode` takes each entry's ``start_ns, end_ns`` and then its slots' integers,
    flat, entry after entry.
    """

    def __init__(self, entries: Sequence[tuple[str, int, Mapping[str, Any] | None]]) -> None:
        if not 0 < len(entries) <= len(_INDEX):
            raise ValueError(f"SpanTree: 1 to {len(_INDEX)} spans, got {len(entries)}")
        spans, order, taken = [], [], 0
        for i, (name, parent, attrs) in enumerate(entries):
            if not -1 <= parent < i:
                raise ValueError(f"SpanTree: entry {i}'s parent must be an earlier entry or -1, got {parent}")
            template, slots = _attribute_template(attrs or {})
            spans.append(b'{"traceId":"%%%%(t)s","spanId":"%%s%s","parentSpanId":"%s","kind":1,'
                         b'"startTimeUnixNano":"%%d","endTimeUnixNano":"%%d","name":%s%s}'
                         % (_INDEX[i], b"%%(p)s" if parent < 0 else b"%s" + _INDEX[parent],
                            _literal(orjson.dumps(str(name))), template))
            # The ids' random prefix is the last value (-1); the parent's id carries it too.
            order += [-1] * (1 + (parent >= 0)) + list(range(taken, taken + 2 + slots))
            taken += 2 + slots
        self._template = b"[%s]" % b",".join(spans)
        self._order = operator.itemgetter(*order)

    def encode(self, values: tuple) -> bytes:
        """The spans of one call (``values`` as the class docstring says), with fresh ids."""
        return self._template % self._order((*values, b"%014x" % (_getrandbits(56) or 1)))


def child_span(spans: bytes, name: bytes, start_ns: int, end_ns: int) -> bytes:
    """``spans`` (:func:`encode_spans`' array) with one more span under the request's span, appended
    without re-encoding the others (a worker adds each request's own ``queue.wait`` to its batch's).
    ``name``: JSON-safe text without ``%``."""
    sid = b"%016x" % (_getrandbits(64) or 1)
    return b'%s,{"traceId":"%%(t)s","spanId":"%s","parentSpanId":"%%(p)s","name":"%s","kind":1,' \
           b'"startTimeUnixNano":"%d","endTimeUnixNano":"%d"}]' % (spans[:-1], sid, name, start_ns, end_ns)


def fill(spans: bytes, trace_id: str, parent_id: str, trace_state: str | None) -> bytes:
    """The spans of :func:`encode_spans` (a JSON array) placed in a trace, under ``parent_id``: the
    array's elements, comma-separated, ready to join a chunk's other spans."""
    trace = trace_id.encode()
    if trace_state:  # the placeholder sits inside "traceId":"..."; the state follows as its own key
        trace += b'","traceState":"' + orjson.dumps(trace_state)[1:-1]
    return spans[1:-1] % {b"t": trace, b"p": parent_id.encode()}


def sdk_span(span: Any) -> bytes:
    """A span made through the OpenTelemetry SDK (a ``ReadableSpan``), encoded the same way."""
    ctx, parent, status = span.context, span.parent, span.status
    out = span_json(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{parent.span_id:016x}" if parent else None,
                    span.name, span.kind.value + 1, span.start_time, span.end_time, dict(span.attributes or {}),
                    trace_state=ctx.trace_state.to_header() if ctx.trace_state else None)
    if status.status_code.value:  # OK (1) or ERROR (2): the same numbers in the SDK and in OTLP
        out["status"] = {"code": status.status_code.value, "message": status.description or ""}
    if span.events:
        out["events"] = [{"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": attributes(e.attributes)}
                         for e in span.events]
    if span.links:
        out["links"] = [{"traceId": f"{ln.context.trace_id:032x}", "spanId": f"{ln.context.span_id:016x}",
                         "attributes": attributes(ln.attributes)} for ln in span.links]
    return orjson.dumps(out)

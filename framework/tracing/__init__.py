"""OpenTelemetry tracing for one process, and trace context across the process boundary.

One record shape and one path: a span is OTLP/JSON bytes from the moment it ends (``otlp.py``),
queued as they are, and exported in chunks as an OTLP/JSON ``TracesData``: a line of
``traces.jsonl``, or the body of an OTLP/HTTP POST (``export.py``). Each process exports its own
spans: a sampled request's frame carries its span to the worker (``framework/transport/protocol.py``),
which records the batch's spans under it (:func:`record_tree`). The exporter's own thread keeps the
time: nothing else has to ask for a flush.

Why not the SDK's tracer on the request path: on this project's 2-core machine a span through
``start_as_current_span`` cost about 80 µs (sampler, context attach, attribute validation, a
lock), and the SDK's OTLP exporter another ~300 µs of CPU per request in ReadableSpan objects and
protobuf encoding (0.24x the untraced throughput on ``echo``; ``benchmarks/tracing.py``). The SDK
stays available for code that wants its own spans: :func:`tracer` returns an SDK tracer whose
spans join the same queue, and :func:`context_of` parents them under a request.

Each process sets itself up after it starts (:func:`init_tracing` in every API process after
fork and in every inference worker after spawn); state inherited across ``fork`` is dropped.

The request path::

    span = tracing.start_request("POST /predict", request.scope["headers"], {"http.route": "/predict"})
    lookup = tracing.record("cache.lookup", tracing.current(), start_ns, end_ns, {"cache.result": "miss"})
    tracing.record_tree(request_frame.parent, tracing.encode_spans([...]))  # in the worker
    response.raw_headers.append((b"traceparent", span.header))  # the client learns its trace id
    span.end(200)
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import multiprocessing.util
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context

from framework.tracing import export, otlp
from framework.tracing.context import (
    ZERO_SPAN_ID,
    ZERO_TRACE_ID,
    SpanRef,
    new_span_id,
    new_trace_id,
    parse_raw_traceparent,
    parse_traceparent,
    ratio_sampled,
)
from framework.tracing.export import Exporter, FileSink, GrpcSink, HttpSink, JsonLinesSpanExporter, StreamSink
from framework.tracing.otlp import attributes_json, child_span, encode_spans, exception_attributes  # noqa: F401

__all__ = [
    "JsonLinesSpanExporter", "RequestSpan", "SpanRef", "attributes_json", "carrier", "child_span", "context_of",
    "current", "enabled", "encode_spans", "exception_attributes", "force_flush", "init_tracing", "parse_traceparent",
    "record", "record_tree", "sampled_current", "shutdown", "start_request", "tracer",
]

log = logging.getLogger("hydraserve.tracing")

TRACER_NAME = "hydraserve"
_NOOP_TRACER: trace.Tracer = trace.NoOpTracer()
_EMPTY_CONTEXT = Context()
_getrandbits = random.getrandbits
_new_object = object.__new__


class _State:
    """Everything one process needs to trace; ``None`` when tracing is off here."""

    def __init__(self, exporter: Exporter, ratio: float, key: tuple, resource: dict) -> None:
        self.exporter = exporter
        self.queue = exporter.queue  # the request path appends here itself (see RequestSpan.end)
        self.chunk = exporter.chunk
        self.full = exporter.full
        self.ratio = ratio
        self.sample_all = ratio >= 1.0
        self.key = key
        self.resource = resource
        self.pid = os.getpid()
        self.tracer: trace.Tracer | None = None  # built on first use of tracer()


_lock = threading.Lock()
_state: _State | None = None
_exit_hook_pid: int | None = None
_current: contextvars.ContextVar[SpanRef | None] = contextvars.ContextVar("hydraserve_span", default=None)


# ----------------------------------------------------------------------------------------------- setup


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


def _make_sink(cfg: Any, output_dir: Any) -> Any:
    exporter = _get(cfg, "exporter", "none")
    if exporter == "file":  # a relative path is under the run's output folder
        path = Path(os.path.expanduser(_get(cfg, "path", "traces.jsonl")))
        return FileSink(Path(output_dir) / path if not path.is_absolute() and output_dir is not None else path)
    if exporter == "console":
        return StreamSink()
    if exporter != "otlp":
        raise ValueError(f"tracing.exporter: must be one of none, console, file, otlp, got '{exporter}'")
    endpoint, timeout = str(_get(cfg, "endpoint")), float(_get(cfg, "timeout_s", 10.0))
    headers = {str(k): str(v) for k, v in dict(_get(cfg, "headers", None) or {}).items()}
    protocol = _get(cfg, "protocol", "http/json")
    if protocol == "grpc":
        return GrpcSink(endpoint, headers, timeout)
    if protocol in ("http/json", "http/protobuf"):
        return HttpSink(endpoint, headers, timeout, protobuf=protocol == "http/protobuf")
    raise ValueError(f"tracing.protocol: must be 'http/json', 'http/protobuf' or 'grpc', got '{protocol}'")


def _resource(cfg: Any, resource_attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    from framework import __version__

    attrs: dict[str, Any] = {"service.name": _get(cfg, "service_name", TRACER_NAME) or TRACER_NAME,
                             "service.version": __version__, "process.pid": os.getpid()}
    for k, v in (resource_attributes or {}).items():
        # Resource values must be primitives; a nested config is kept readable as text.
        attrs[str(k)] = v if isinstance(v, (str, bool, int, float)) else str(v)
    return attrs


def _config_key(cfg: Any, resource_attributes: Mapping | None, output_dir: Any) -> tuple:
    fields = ("exporter", "path", "endpoint", "protocol", "timeout_s", "sample_ratio", "service_name",
              "flush_interval_ms", "max_queue_size")
    headers = tuple(sorted((str(k), str(v)) for k, v in dict(_get(cfg, "headers", None) or {}).items()))
    attrs = tuple(sorted((str(k), str(v)) for k, v in (resource_attributes or {}).items()))
    return (*(str(_get(cfg, f)) for f in fields), headers, attrs, str(output_dir))


def init_tracing(cfg: Any, resource_attributes: Mapping[str, Any] | None = None,
                 output_dir: str | os.PathLike | None = None) -> None:
    """Set up this process's tracing from ``cfg`` (a ``TracingConfig`` or a mapping).

    Idempotent: a second call in the same process with the same arguments does nothing; with other
    arguments it flushes and replaces the setup. ``exporter: none`` builds nothing, so every call
    on the request path returns at its first line. ``resource_attributes`` (model, quantization,
    batching, cache, hardware, ...) join ``service.name`` / ``service.version`` on every span.
    """
    global _state
    key = _config_key(cfg, resource_attributes, output_dir)
    pid = os.getpid()
    with _lock:
        if _state is not None and _state.pid == pid and _state.key == key:
            return
        _shutdown_locked()
        if _get(cfg, "exporter", "none") == "none":
            return
        from framework import __version__

        resource = _resource(cfg, resource_attributes)
        sink = _make_sink(cfg, output_dir)
        exporter = Exporter(sink, export.resource_json(resource, TRACER_NAME, __version__),
                            int(_get(cfg, "max_queue_size", 8192)), float(_get(cfg, "flush_interval_ms", 500)) / 1000,
                            inline=isinstance(sink, FileSink))
        _state = _State(exporter, float(_get(cfg, "sample_ratio", 1.0)), key, resource)
        _register_exit_hook(pid)


def _register_exit_hook(pid: int) -> None:
    global _exit_hook_pid
    if _exit_hook_pid == pid:
        return
    _exit_hook_pid = pid
    atexit.register(shutdown)
    # A multiprocessing child leaves through os._exit: atexit never runs there, its finalizers do.
    multiprocessing.util.Finalize(None, shutdown, exitpriority=100)


def _forget_after_fork() -> None:
    """In a forked child: drop the parent's state without touching its file or thread."""
    global _state, _exit_hook_pid, _lock
    _lock = threading.Lock()
    _state, _exit_hook_pid = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _shutdown_locked() -> None:
    global _state
    state, _state = _state, None
    if state is None or state.pid != os.getpid():
        return
    try:
        state.exporter.shutdown()
    except Exception:  # at exit, a dead collector must not turn into a traceback
        log.exception("tracing: shutdown failed")


def shutdown() -> None:
    """Export pending spans and stop the exporter (runs at exit too). Tracing is off afterwards."""
    with _lock:
        _shutdown_locked()


def force_flush() -> None:
    """Export every span ended so far, on the caller's thread (tests and the CLI, before reading)."""
    state = _state
    if state is not None:
        state.exporter.flush()


def enabled() -> bool:
    """True when this process exports spans (``exporter`` is not ``none`` and init ran here)."""
    return _state is not None


def tracer() -> trace.Tracer:
    """An OpenTelemetry SDK tracer whose spans join this process's export (a no-op one when off).

    For code outside the request path; parent its spans with :func:`context_of`.
    """
    state = _state
    if state is None:
        return _NOOP_TRACER
    if state.tracer is None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Processor(SpanProcessor):  # SDK spans, in the one shape, into the same queue
            def on_end(self, span: Any) -> None:
                if span.context.trace_flags.sampled:
                    state.exporter.add(otlp.sdk_span(span))

        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(state.ratio)),
                                  resource=Resource.create(state.resource), shutdown_on_exit=False)
        provider.add_span_processor(Processor())
        state.tracer = provider.get_tracer(TRACER_NAME)
    return state.tracer


# ------------------------------------------------------------------------------------------ request path

# The SERVER span's bytes, in one % formatting (its name and attributes encoded once per route).
_SERVER_SPAN = b'{"traceId":"%s","spanId":"%s"%s,"name":%s,"kind":2,"startTimeUnixNano":"%d",' \
               b'"endTimeUnixNano":"%d","attributes":[%s%s]%s}'
_encoded: dict[int, tuple] = {}  # a route's name and shared attributes, encoded once
_statuses: dict[int, tuple[bytes, bytes]] = {}


def _encode_start(name: str, attrs: dict) -> tuple:
    if len(_encoded) > 256:  # attributes made per request (not a route's shared dict): a bounded cache
        _encoded.clear()
    kvs = orjson.dumps(otlp.attributes(attrs))[1:-1]
    entry = _encoded[id(attrs)] = (attrs, name, orjson.dumps(name), kvs + b"," if kvs else b"")
    return entry


def _encode_status(code: int) -> tuple[bytes, bytes]:
    """The status code's attribute and, for a 5xx (HTTP conventions: only those are errors), the
    ``error.type`` attribute and the ERROR status."""
    kv = b'{"key":"http.response.status_code","value":{"intValue":"%d"}}' % code
    if code < 500:
        return kv, b""
    return kv + b',{"key":"error.type","value":{"stringValue":"%d"}}' % code, b',"status":{"code":2}'


class RequestSpan(SpanRef):
    """The SERVER span of one HTTP request, made by :func:`start_request`; current for the request's
    task until :meth:`end`. It is its own :class:`SpanRef` (what :func:`current` returns and children
    nest under). ``header`` is the ``traceparent`` response header's value (bytes)."""

    __slots__ = ("parent", "name", "attributes", "start_ns", "header", "_token")

    remote = False  # a span of this process (a class attribute: one less store per request)

    @property
    def ref(self) -> SpanRef:
        return self

    def detach(self) -> None:
        """Stop being the current span of this task, without ending: a streamed response's span ends
        (``end``) when its last piece is sent, from the task that sends it."""
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def end(self, status_code: int) -> None:
        """Close the span with the response status (HTTP conventions: only 5xx is an error)."""
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        state = _state
        if state is None or not self.sampled:
            return
        attrs = self.attributes
        encoded = _encoded.get(id(attrs))
        if encoded is None or encoded[0] is not attrs or encoded[1] != self.name:
            encoded = _encode_start(self.name, attrs)
        status = _statuses.get(status_code) or _statuses.setdefault(status_code, _encode_status(status_code))
        parent = self.parent
        header = self.header
        span = _SERVER_SPAN % (
            header[3:35], header[36:52],  # the ids, as bytes already
            b"" if parent is None else b',"parentSpanId":"%s"' % parent.span_id.encode(),
            encoded[2], self.start_ns, time.time_ns(), encoded[3], status[0],
            status[1] if not self.trace_state else status[1] + b',"traceState":' + orjson.dumps(self.trace_state))
        queue = state.queue  # Exporter.add, in line: this runs once per request
        queue.append(span)
        if len(queue) >= state.chunk:
            state.full()


def start_request(name: str, headers: Mapping[str, Any] | list | None, attributes: dict) -> RequestSpan | None:
    """Start a request's SERVER span, continuing the client's ``traceparent`` if it sent one.

    ``headers``: a mapping (request headers, a carrier dict) or an ASGI scope's raw header list.
    ``None`` when tracing is off in this process. A request without a (valid) header starts a new
    trace, sampled by ``tracing.sample_ratio``; one with a header follows the client's sampled flag
    (OpenTelemetry's ``ParentBased`` rule). ``attributes`` must not change afterwards (one dict can
    serve every request of a route, and is encoded once); :meth:`end` adds the response status.

    Every request of a traced server runs this, so it is written as one function: each Python call
    it saved was a measurable share of an ``echo`` request (``benchmarks/instructions.py``).
    """
    state = _state
    if state is None:
        return None
    if type(headers) is list:  # an ASGI scope's raw headers (names lowercase): one pass, no Headers object
        header = trace_state = None
        for key, value in headers:
            if key == b"traceparent":
                header = value
            elif key == b"tracestate":
                trace_state = value
        parent = None if header is None else parse_raw_traceparent(header, trace_state)
    else:
        parent = parse_traceparent(headers)
    span = _new_object(RequestSpan)
    span.parent = parent
    if parent is None:
        ids = _getrandbits(192).to_bytes(24, "big").hex()  # trace id and span id from one draw
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id == ZERO_TRACE_ID or span_id == ZERO_SPAN_ID:  # invalid ids; once in 2**64 draws
            trace_id, span_id = new_trace_id(), new_span_id()  # each never all zeros
        sampled = state.sample_all or ratio_sampled(trace_id, state.ratio)
        span.trace_state = None
    else:
        trace_id, span_id, sampled = parent.trace_id, new_span_id(), parent.sampled
        span.trace_state = parent.trace_state
    span.trace_id = trace_id
    span.span_id = span_id
    span.sampled = sampled
    span.header = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode()
    span.name = name
    span.attributes = attributes
    span.start_ns = time.time_ns()
    span._token = _current.set(span)
    return span


# The current request's span in this task (``None`` outside a traced request): the context
# variable's own getter, so asking costs no Python call.
current: Callable[[], SpanRef | None] = _current.get


def carrier() -> dict[str, str] | None:
    """The current request's ``traceparent``/``tracestate`` for a message to another process or
    service; ``None`` when the request is not sampled, so the other side records nothing for it."""
    ref = sampled_current()
    return ref.carrier() if ref is not None else None


def sampled_current() -> SpanRef | None:
    """The current request's span if its trace is sampled (children recorded under it are kept)."""
    ref = _current.get()
    return ref if ref is not None and ref.sampled else None


def record(name: str, parent: SpanRef | None, start_ns: int, end_ns: int, attributes: Mapping | None = None,
           kind: str = "INTERNAL", error: BaseException | str | None = None) -> SpanRef | None:
    """Record a finished child of ``parent`` whose times are already known (a cache lookup).
    Returns the new span's ref, to parent its own children; ``None`` (and nothing recorded) when
    tracing is off, there is no parent, or the trace is not sampled. ``error`` marks the span as
    failed; an exception also becomes an ``exception`` event."""
    state = _state
    if state is None or parent is None or not parent.sampled:
        return None
    sid = new_span_id()
    span = otlp.span_json(parent.trace_id, sid, parent.span_id, name, otlp.KIND[kind], start_ns, end_ns, attributes,
                          error, parent.trace_state)
    state.exporter.add(orjson.dumps(span))
    return SpanRef(parent.trace_id, sid, True, parent.trace_state)


def record_tree(parent: SpanRef | None, spans: list[tuple] | bytes) -> None:
    """Record several finished spans under ``parent`` at once: a worker's spans of one request.

    ``spans`` is what :func:`encode_spans` (or a :class:`~framework.tracing.otlp.SpanTree`)
    returned, queued without being parsed, or its entries ``(name, start_ns, end_ns, attributes,
    parent_index, error)`` to encode here. ``parent`` may be another process's span (the one a
    request frame names in the worker). Nothing is recorded when tracing is off or ``parent`` is
    missing or not sampled.
    """
    state = _state
    if state is None or parent is None or not parent.sampled:
        return
    if type(spans) is not bytes:
        spans = encode_spans(spans)
    if len(spans) > 2:  # not an empty array
        state.exporter.add(otlp.fill(spans, parent.trace_id, parent.span_id, parent.trace_state))


# ------------------------------------------------------------------------------------- SDK interoperation


def context_of(ref: SpanRef | None) -> Context:
    """An OpenTelemetry ``Context`` whose current span is ``ref``: pass it as ``context=`` to an SDK
    tracer's ``start_span`` to nest a span under a request (an empty context: a new root)."""
    if ref is None:
        return _EMPTY_CONTEXT
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if ref.sampled else trace.TraceFlags.DEFAULT)
    state = trace.TraceState.from_header([ref.trace_state]) if ref.trace_state else None
    span_context = trace.SpanContext(int(ref.trace_id, 16), int(ref.span_id, 16), ref.remote, flags, state)
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), _EMPTY_CONTEXT)


"""OpenTelemetry tracing for one process, and trace context across the process boundary.

Why not the SDK's tracer on the request path: on this project's 2-core machine a request span
through ``start_as_current_span`` cost about 80 µs (sampler, context attach, attribute validation,
a lock per span), and the worker's five spans another 60 µs. With the ``echo`` model that halved
the throughput at saturation (``benchmarks/tracing.py``). The framework's own spans are therefore
recorded as plain tuples (shaped as :class:`~framework.tracing.records.SpanRecord`) with W3C-compatible ids
and sampling, queued without a lock, and turned into JSON lines or SDK spans later: by whichever
call fills a chunk (the file exporter has no thread), or by one exporting thread (OTLP, console).
The inference worker records nothing on the request path: its timings travel back in each sampled
request's answer, and the API process records them under the request's span. What reaches the
file or the collector is the same OpenTelemetry data: trace and span ids, parent links, kinds,
attributes, status, exception events, and a resource.

The SDK stays available for code that wants its own spans: :func:`tracer` returns an SDK tracer
whose spans go through the same queue and exporter, and :func:`context_of` turns a request's
:class:`SpanRef` into an OpenTelemetry ``Context`` to parent them.

Each process sets itself up after it starts (:func:`init_tracing` in every API process after fork
and in every inference worker after spawn). State inherited across ``fork`` is never reused (its
file descriptor and thread belong to the parent); a fork hook drops it in the child.

The request path::

    span = tracing.start_request("POST /predict", request.headers, {"http.route": "/predict"})
    # spans whose times are already measured, as one tree record (the worker's timings, sent back
    # with its answer, under the request's span)
    tracing.record_tree(span.ref, [("batch", start_ns, end_ns, {"batch.size": 8}, -1, None),
                                   ("model.forward", t0, t1, None, 0, None)])
    # or one span at a time, each returning the ref its children nest under
    lookup = tracing.record("cache.lookup", tracing.current(), start_ns, end_ns)
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
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

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
from framework.tracing.export import JsonLinesSpanExporter, Recorder, RecorderProcessor, SdkSink
from framework.tracing.records import NO_EVENTS, error_fields

__all__ = [
    "JsonLinesSpanExporter",
    "RequestSpan",
    "SpanRef",
    "carrier",
    "context_of",
    "current",
    "enabled",
    "extract_context",
    "flush_if_due",
    "flush_interval_s",
    "force_flush",
    "init_tracing",
    "parse_traceparent",
    "record",
    "record_tree",
    "resolve_path",
    "sampled_current",
    "seconds_until_flush",
    "shutdown",
    "start_request",
    "tracer",
]

log = logging.getLogger("hydraserve.tracing")

TRACER_NAME = "hydraserve"
_NOOP_TRACER: trace.Tracer = trace.NoOpTracer()
_EMPTY_CONTEXT = Context()
_getrandbits = random.getrandbits
_new_object = object.__new__


class _State:
    """Everything one process needs to trace; ``None`` when tracing is off here."""

    def __init__(self, recorder: Recorder, ratio: float, provider: TracerProvider, key: tuple) -> None:
        self.recorder = recorder
        # The request path appends to the recorder's queues itself (see RequestSpan.end).
        self.rows = recorder.rows
        self.trees = recorder.trees
        self.chunk = recorder.chunk
        self.chunk_ready = recorder.chunk_ready
        # The file takes spans that arrive as JSON as they are; the SDK exporters parse them.
        self.embeds_json = isinstance(recorder.sink, JsonLinesSpanExporter)
        self.ratio = ratio
        self.sample_all = ratio >= 1.0
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.pid = os.getpid()
        self.key = key


_lock = threading.Lock()
_state: _State | None = None
_exit_hook_pid: int | None = None
_current: contextvars.ContextVar[SpanRef | None] = contextvars.ContextVar("hydraserve_span", default=None)


# ----------------------------------------------------------------------------------------------- setup


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, Mapping) else cfg.get(name, default)


def resolve_path(path: str, output_dir: str | os.PathLike | None) -> Path:
    """The file exporter's path: relative paths are under ``output_dir`` (the run's output folder)."""
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and output_dir is not None:
        p = Path(output_dir) / p
    return p


def _otlp_exporter(cfg: Any) -> SpanExporter:
    endpoint = _get(cfg, "endpoint")
    headers = {str(k): str(v) for k, v in dict(_get(cfg, "headers", None) or {}).items()}
    timeout = float(_get(cfg, "timeout_s", 10.0))
    protocol = _get(cfg, "protocol", "http/protobuf")
    # Imported here: the exporters pull in requests / grpc, which a server without OTLP never needs.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc(endpoint=endpoint, insecure=str(endpoint).startswith("http://"), headers=headers or None,
                    timeout=timeout)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http(endpoint=endpoint, headers=headers or None, timeout=timeout)
    raise ValueError(f"tracing.protocol: must be 'http/protobuf' or 'grpc', got '{protocol}'")


def _make_sink(cfg: Any, output_dir: Any, resource: Resource) -> JsonLinesSpanExporter | SdkSink:
    exporter = _get(cfg, "exporter", "none")
    if exporter == "file":
        return JsonLinesSpanExporter(resolve_path(_get(cfg, "path", "traces.jsonl"), output_dir), resource)
    scope = InstrumentationScope(TRACER_NAME)
    if exporter == "console":
        # out= explicitly: the SDK's default is the sys.stdout of import time, not of now.
        return SdkSink(ConsoleSpanExporter(service_name=_get(cfg, "service_name", TRACER_NAME), out=sys.stdout),
                       resource, scope)
    if exporter == "otlp":
        return SdkSink(_otlp_exporter(cfg), resource, scope)
    raise ValueError(f"tracing.exporter: must be one of none, console, file, otlp, got '{exporter}'")


def _resource(cfg: Any, resource_attributes: Mapping[str, Any] | None) -> Resource:
    from framework import __version__

    attrs: dict[str, Any] = {
        "service.name": _get(cfg, "service_name", TRACER_NAME) or TRACER_NAME,
        "service.version": __version__,
        "process.pid": os.getpid(),
    }
    for k, v in (resource_attributes or {}).items():
        # Resource values must be primitives; a nested config is kept readable as text.
        attrs[str(k)] = v if isinstance(v, (str, bool, int, float)) else str(v)
    return Resource.create(attrs)


def _config_key(cfg: Any, resource_attributes: Mapping | None, output_dir: Any) -> tuple:
    fields = ("exporter", "path", "endpoint", "protocol", "timeout_s", "sample_ratio", "service_name",
              "flush_interval_ms", "max_queue_size")
    values = tuple(str(_get(cfg, f)) for f in fields)
    headers = tuple(sorted((str(k), str(v)) for k, v in dict(_get(cfg, "headers", None) or {}).items()))
    attrs = tuple(sorted((str(k), str(v)) for k, v in (resource_attributes or {}).items()))
    return values + (headers, attrs, str(output_dir))


def init_tracing(
    cfg: Any,
    resource_attributes: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
) -> None:
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
        ratio = float(_get(cfg, "sample_ratio", 1.0))
        resource = _resource(cfg, resource_attributes)
        sink = _make_sink(cfg, output_dir, resource)
        recorder = Recorder(sink, int(_get(cfg, "max_queue_size", 8192)),
                            float(_get(cfg, "flush_interval_ms", 500)) / 1000.0,
                            inline=isinstance(sink, JsonLinesSpanExporter))
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)), resource=resource,
                                  shutdown_on_exit=False)  # our exit hook also covers multiprocessing children
        provider.add_span_processor(RecorderProcessor(recorder))
        _state = _State(recorder, ratio, provider, key)
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
        state.recorder.shutdown()
    except Exception:  # at exit, a dead collector must not turn into a traceback
        log.exception("tracing: shutdown failed")


def shutdown() -> None:
    """Export pending spans and stop the exporter (runs at exit too). Tracing is off afterwards."""
    with _lock:
        _shutdown_locked()


def force_flush() -> None:
    """Export every span ended so far (tests and the CLI use this before reading the file)."""
    state = _state
    if state is not None:
        state.recorder.flush()


def flush_if_due() -> None:
    """Export queued spans if ``tracing.flush_interval_ms`` has passed since the last export.

    A process's main loop calls this when it has a moment (the API process on a timer of its event
    loop, a worker before it waits for work): the file exporter has no thread of its own.
    """
    state = _state
    if state is not None:
        state.recorder.flush_if_due()


def seconds_until_flush() -> float | None:
    """How long this process may wait before calling :func:`flush_if_due`; ``None``: no deadline."""
    state = _state
    return state.recorder.seconds_until_due() if state is not None else None


def flush_interval_s() -> float | None:
    """``tracing.flush_interval_ms`` in seconds, or ``None`` when tracing is off in this process."""
    state = _state
    return state.recorder.flush_interval_s if state is not None else None


def enabled() -> bool:
    """True when this process exports spans (``exporter`` is not ``none`` and init ran here)."""
    return _state is not None


def tracer() -> trace.Tracer:
    """An OpenTelemetry SDK tracer whose spans join this process's export (a no-op one when off).

    For code outside the request path; parent its spans with :func:`context_of`.
    """
    state = _state
    return state.tracer if state is not None else _NOOP_TRACER


# ------------------------------------------------------------------------------------------ request path


class RequestSpan(SpanRef):
    """The SERVER span of one HTTP request, made by :func:`start_request`; current for the request's
    task until :meth:`end`.

    It is its own :class:`SpanRef` (``span.ref is span``): what :func:`current` returns and children
    nest under. ``header`` is the ``traceparent`` response header's value (bytes), which tells the
    client the trace id.
    """

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
        attrs = {**self.attributes, "http.response.status_code": status_code}
        status = "UNSET"
        if status_code >= 500:
            attrs["error.type"] = str(status_code)
            status = "ERROR"
        parent = self.parent
        rows = state.rows  # Recorder.add, in line: this runs once per request
        rows.append((self.name, self.trace_id, self.span_id, parent.span_id if parent is not None else None,
                     parent is not None, "SERVER", self.start_ns, time.time_ns(), attrs, status, None, NO_EVENTS,
                     self.trace_state))  # a SpanRecord's fields, as a plain tuple (see records.py)
        if len(rows) >= state.chunk:
            state.chunk_ready(rows)


def start_request(name: str, headers: Mapping[str, Any] | list | None, attributes: dict) -> RequestSpan | None:
    """Start a request's SERVER span, continuing the client's ``traceparent`` if it sent one.

    ``headers``: a mapping (request headers, a carrier dict) or an ASGI scope's raw header list.
    ``None`` when tracing is off in this process. A request without a (valid) header starts a new
    trace, sampled by ``tracing.sample_ratio``; one with a header follows the client's sampled flag
    (OpenTelemetry's ``ParentBased`` rule). ``attributes`` is not changed (one dict can serve every
    request of a route): :meth:`end` records a copy with the response status added.

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


def record(
    name: str,
    parent: SpanRef | None,
    start_ns: int,
    end_ns: int,
    attributes: dict | None = None,
    kind: str = "INTERNAL",
    error: BaseException | str | None = None,
) -> SpanRef | None:
    """Record a finished child of ``parent`` whose times are already known (queue wait, a batch and
    its phases, a cache lookup). Returns the new span's ref, to parent its own children; ``None``
    (and nothing recorded) when tracing is off, there is no parent, or the trace is not sampled.

    ``attributes`` is kept as given (pass primitive values or lists of them; do not mutate it
    afterwards). ``error`` marks the span as failed; an exception also becomes an ``exception`` event.
    """
    state = _state
    if state is None or parent is None or not parent.sampled:
        return None
    span_id = new_span_id()
    status, description, events = error_fields(error, end_ns)
    state.recorder.add((name, parent.trace_id, span_id, parent.span_id, parent.remote, kind, start_ns, end_ns,
                        attributes, status, description, events, parent.trace_state))
    return SpanRef(parent.trace_id, span_id, True, parent.trace_state)


def record_tree(parent: SpanRef | None, spans: list[tuple] | bytes) -> None:
    """Record several finished spans of one trace at once (the worker's spans for one request).

    Each entry is ``(name, start_ns, end_ns, attributes, parent_index, error)``: ``parent_index``
    is the position of an earlier entry to nest under, or -1 for ``parent`` itself; ``error`` is
    ``None``, a description or an exception. ``spans`` may also be the entries already serialized
    as one JSON array (bytes, ``orjson.dumps(entries)``, an error then as its exception's attributes):
    what a worker's answer carries, written to the file without being parsed. Nothing is recorded
    when tracing is off or ``parent`` is missing or not sampled. The same spans as calls to
    :func:`record`, queued as one entry (a :class:`~framework.tracing.records.TreeRecord`; do not
    change ``spans`` afterwards) that the file stores as it is and the SDK exporters expand: well
    under a microsecond for the whole tree.
    """
    state = _state
    if state is None or parent is None or not parent.sampled:
        return
    if type(spans) is bytes and state.embeds_json:
        spans = orjson.Fragment(spans)
    trees = state.trees  # Recorder.add, in line: a traced server runs this once per sampled request
    trees.append((parent.trace_id, parent.trace_state, parent.span_id, parent.remote, _getrandbits(64), spans))
    if len(trees) >= state.chunk:
        state.chunk_ready(trees)


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


def extract_context(carrier: Mapping[str, Any] | None) -> Context:
    """The OpenTelemetry ``Context`` a ``traceparent`` carrier (a dict, or headers) describes."""
    return context_of(parse_traceparent(carrier))

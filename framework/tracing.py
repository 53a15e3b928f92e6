"""OpenTelemetry setup for one process, and trace context across the process boundary.

Each process builds its own ``TracerProvider``: every API process after fork and every inference
worker after spawn calls :func:`init_tracing`. A provider inherited across ``fork`` is never reused
(its exporter's sockets, file offsets and worker thread belong to the parent), so a fork hook drops
it in the child and the next :func:`init_tracing` there builds a fresh one.

The global OpenTelemetry provider is left alone on purpose: it can be set only once per process and
the flag survives ``fork``; code here asks :func:`tracer` instead.

Typical use in a request path::

    from framework import tracing
    parent = tracing.extract_context(request.headers)            # W3C traceparent / tracestate
    with tracing.tracer().start_as_current_span("POST /predict", context=parent, kind=SERVER) as span:
        payload["trace"] = tracing.inject_carrier()               # crosses into the worker
        response.headers["traceparent"] = tracing.traceparent_of(span)
    # in the worker
    with tracing.tracer().start_as_current_span("predict", context=tracing.extract_context(msg["trace"])):
        ...
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import random
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "JsonLinesSpanExporter",
    "enabled",
    "extract_context",
    "init_tracing",
    "inject_carrier",
    "record_span",
    "resolve_path",
    "shutdown",
    "traceparent_of",
    "tracer",
]

log = logging.getLogger(__name__)

TRACER_NAME = "hydraserve"
_NOOP_TRACER: trace.Tracer = trace.NoOpTracer()
_PROPAGATOR = TraceContextTextMapPropagator()
_EMPTY_CONTEXT = Context()
_KIND_NAMES = {k: k.name for k in trace.SpanKind}
_STATUS_NAMES = {c: c.name for c in trace.StatusCode}
_UNSET = trace.Status(trace.StatusCode.UNSET)
_HAS_FRAGMENT = hasattr(orjson, "Fragment")

# Per-process state. ``_pid`` is the process that built ``_provider``; a fork hook resets all of it.
_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = _NOOP_TRACER
_pid: int | None = None
_key: tuple | None = None  # what the current provider was built from, for idempotent re-calls
_fast: tuple | None = None  # (span processor, resource, scope) for record_span; None when off
_exit_hook_pid: int | None = None


# --------------------------------------------------------------------------------------------- file exporter


class JsonLinesSpanExporter(SpanExporter):
    """Writes one JSON object per span and line, with orjson.

    The file is opened with ``O_APPEND`` and each batch goes out in one ``write`` of whole lines, so
    several processes can append to the same file without interleaving inside a line.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._resource_cache: tuple[Resource | None, Any] = (None, None)
        self._write_lock = threading.Lock()

    def _resource_json(self, resource: Resource) -> Any:
        # The resource is the same object for every span of a provider: serialize it once
        # (orjson.Fragment embeds ready JSON; an orjson without it gets the dict).
        cached, fragment = self._resource_cache
        if cached is not resource or fragment is None:
            attrs = dict(resource.attributes)
            fragment = orjson.Fragment(orjson.dumps(attrs, default=str)) if _HAS_FRAGMENT else attrs
            self._resource_cache = (resource, fragment)
        return fragment

    def span_to_dict(self, span: ReadableSpan) -> dict[str, Any]:
        # Runs in the exporter thread, but holds the GIL: kept lean (no enum lookups, no empty copies).
        ctx = span.context
        parent = span.parent
        status = span.status
        events = span.events
        links = span.links
        return {
            "trace_id": ctx.trace_id.to_bytes(16, "big").hex(),
            "span_id": ctx.span_id.to_bytes(8, "big").hex(),
            "parent_span_id": parent.span_id.to_bytes(8, "big").hex() if parent is not None else None,
            "parent_remote": parent is not None and parent.is_remote,
            "name": span.name,
            "kind": _KIND_NAMES[span.kind],
            "start_ns": span.start_time,
            "end_ns": span.end_time,
            "attributes": dict(span.attributes),
            "status": {"code": _STATUS_NAMES[status.status_code], "description": status.description},
            "events": [
                {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                for e in events
            ]
            if events
            else [],
            "links": [
                {
                    "trace_id": link.context.trace_id.to_bytes(16, "big").hex(),
                    "span_id": link.context.span_id.to_bytes(8, "big").hex(),
                    "attributes": dict(link.attributes or {}),
                }
                for link in links
            ]
            if links
            else [],
            "resource": self._resource_json(span.resource),
        }

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        try:
            data = b"".join(
                orjson.dumps(self.span_to_dict(s), default=str, option=orjson.OPT_APPEND_NEWLINE)
                for s in spans
            )
            with self._write_lock:
                view = memoryview(data)
                while view:  # a regular file takes it all at once; loop only for the pathological case
                    written = os.write(self._fd, view)
                    view = view[written:]
        except Exception:  # an exporter must never raise into the SDK's worker thread
            log.exception("tracing: cannot write spans to %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is a write(2); nothing is buffered here


# ----------------------------------------------------------------------------------------------- setup


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, Mapping) else cfg.get(name, default)


def resolve_path(path: str, output_dir: str | os.PathLike | None) -> Path:
    """The file exporter's path: relative paths are under ``output_dir`` (the run's output folder)."""
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and output_dir is not None:
        p = Path(output_dir) / p
    return p


def _make_exporter(cfg: Any, output_dir: str | os.PathLike | None) -> SpanExporter:
    exporter = _get(cfg, "exporter", "none")
    if exporter == "console":
        # out= explicitly: the SDK's default is the sys.stdout of import time, not of now.
        return ConsoleSpanExporter(service_name=_get(cfg, "service_name", TRACER_NAME), out=sys.stdout)
    if exporter == "file":
        return JsonLinesSpanExporter(resolve_path(_get(cfg, "path", "traces.jsonl"), output_dir))
    if exporter == "otlp":
        endpoint = _get(cfg, "endpoint")
        headers = {str(k): str(v) for k, v in dict(_get(cfg, "headers", None) or {}).items()}
        timeout = float(_get(cfg, "timeout_s", 10.0))
        protocol = _get(cfg, "protocol", "http/protobuf")
        # Imported here: the exporters pull in requests / grpc, which a disabled server never needs.
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            return Grpc(
                endpoint=endpoint,
                insecure=str(endpoint).startswith("http://"),
                headers=headers or None,
                timeout=timeout,
            )
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

            return Http(endpoint=endpoint, headers=headers or None, timeout=timeout)
        raise ValueError(f"tracing.protocol: must be 'http/protobuf' or 'grpc', got '{protocol}'")
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
    """Build this process's TracerProvider from ``cfg`` (a ``TracingConfig`` or a mapping).

    Idempotent: a second call in the same process with the same arguments does nothing; with other
    arguments it flushes and replaces the provider. ``exporter: none`` builds nothing, so spans are
    the API's no-ops. ``resource_attributes`` (model, quantization, batching, cache, hardware, ...)
    are added to ``service.name`` / ``service.version`` on every span.
    """
    global _provider, _tracer, _pid, _key, _fast
    key = _config_key(cfg, resource_attributes, output_dir)
    pid = os.getpid()
    with _lock:
        if _pid == pid and _key == key:
            return
        if _pid == pid and _provider is not None:
            _shutdown_locked()
        # A provider from another pid (inherited across fork) is abandoned, never flushed or reused.
        _provider, _tracer, _pid, _key, _fast = None, _NOOP_TRACER, pid, key, None
        if _get(cfg, "exporter", "none") == "none":
            return
        ratio = float(_get(cfg, "sample_ratio", 1.0))
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(ratio)),
            resource=_resource(cfg, resource_attributes),
            shutdown_on_exit=False,  # our own exit hook below also covers multiprocessing children
        )
        queue_size = int(_get(cfg, "max_queue_size", 8192))
        processor = BatchSpanProcessor(
            _make_exporter(cfg, output_dir),
            max_queue_size=queue_size,
            schedule_delay_millis=float(_get(cfg, "flush_interval_ms", 500)),
            max_export_batch_size=min(512, queue_size),
        )
        provider.add_span_processor(processor)
        _provider = provider
        _tracer = provider.get_tracer(TRACER_NAME)
        _fast = (processor, provider.resource, InstrumentationScope(TRACER_NAME))
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
    """In a forked child: drop the parent's provider without touching its exporter or thread."""
    global _provider, _tracer, _pid, _key, _exit_hook_pid, _lock, _fast
    _lock = threading.Lock()
    _provider, _tracer, _pid, _key, _exit_hook_pid, _fast = None, _NOOP_TRACER, None, None, None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def tracer() -> trace.Tracer:
    """This process's tracer; the API's no-op tracer when tracing is off or not initialised here."""
    return _tracer


def enabled() -> bool:
    """True when this process exports spans (``exporter`` is not ``none`` and init ran here)."""
    return _provider is not None


def _shutdown_locked() -> None:
    global _provider, _tracer, _key, _fast
    provider, _provider, _tracer, _key, _fast = _provider, None, _NOOP_TRACER, None, None
    if provider is None or _pid != os.getpid():
        return
    try:
        provider.force_flush()
        provider.shutdown()
    except Exception:  # at exit, a dead collector must not turn into a traceback
        log.exception("tracing: shutdown failed")


def shutdown() -> None:
    """Flush pending spans and stop the exporter (runs at exit too). Tracing is off afterwards."""
    with _lock:
        _shutdown_locked()


def force_flush(timeout_millis: int = 30000) -> bool:
    """Export every span ended so far (tests and the CLI use this before reading the file)."""
    provider = _provider
    return provider.force_flush(timeout_millis) if provider is not None else True


# ------------------------------------------------------------------------------------- spans after the fact


def record_span(
    name: str,
    parent: Context | trace.SpanContext | None,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    error: BaseException | str | None = None,
) -> trace.SpanContext | None:
    """Record a finished span whose times are already known (queue wait, a batch and its phases).

    Several times cheaper than ``start_span(...).end(...)``: no sampler call, no context attach, no
    attribute re-validation (pass primitive values or lists of them), no lock. ``parent`` is a
    context from :func:`extract_context` or the ``SpanContext`` an earlier call returned (to nest
    phases under a batch span). The parent's sampled flag decides, as ``ParentBased`` would; a span
    without a valid parent goes through the normal SDK path so the ratio sampler still applies.
    Returns the new span's context (pass it as ``parent`` of its children), or ``None`` when
    nothing was recorded (tracing off, or the trace is not sampled).
    """
    fast = _fast
    if fast is None:
        return None
    if parent is None or isinstance(parent, Context):
        parent = trace.get_current_span(parent).get_span_context()
    if not parent.is_valid:
        span = _tracer.start_span(name, context=_EMPTY_CONTEXT, kind=kind, attributes=attributes,
                                  start_time=start_ns)
        if error is not None:
            if isinstance(error, BaseException):
                span.record_exception(error, timestamp=end_ns)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        span.end(end_time=end_ns)
        ctx = span.get_span_context()
        return ctx if ctx.trace_flags.sampled else None
    if not parent.trace_flags.sampled:
        return None
    processor, resource, scope = fast
    ctx = trace.SpanContext(parent.trace_id, _random_span_id(), False, parent.trace_flags, parent.trace_state)
    status, events = _UNSET, ()
    if error is not None:
        status = trace.Status(trace.StatusCode.ERROR, str(error))
        if isinstance(error, BaseException):  # what span.record_exception would add
            events = (Event("exception", {"exception.type": type(error).__qualname__,
                                          "exception.message": str(error)}, timestamp=end_ns),)
    processor.on_end(ReadableSpan(
        name=name, context=ctx, parent=parent, resource=resource,
        attributes=dict(attributes) if attributes else {}, events=events, kind=kind, status=status,
        start_time=start_ns, end_time=end_ns, instrumentation_scope=scope,
    ))
    return ctx


def _random_span_id() -> int:
    span_id = random.getrandbits(64)
    while span_id == 0:  # 0 is the invalid span id
        span_id = random.getrandbits(64)
    return span_id


# --------------------------------------------------------------------------------------------- propagation


def inject_carrier(context: Context | None = None) -> dict[str, str]:
    """W3C ``traceparent`` (and ``tracestate``) of ``context`` (default: the current one), as a dict.

    Put it in the queued message; :func:`extract_context` in the worker continues the same trace.
    Empty when this process does not trace, so a disabled server carries nothing.
    """
    if _provider is None:
        return {}
    # What TraceContextTextMapPropagator.inject writes, without its setter/getter indirection.
    ctx = trace.get_current_span(context).get_span_context()
    if not ctx.is_valid:
        return {}
    carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"}
    if ctx.trace_state:
        carrier["tracestate"] = ctx.trace_state.to_header()
    return carrier


def extract_context(carrier: Mapping[str, Any] | None) -> Context:
    """The context carried by ``carrier`` (a dict, or request headers); an empty one (a new root) if none.

    Passing the result as ``context=`` to ``start_as_current_span`` makes the new span a child of
    the remote one; an empty context starts a new trace instead of inheriting whatever is current.
    """
    if not carrier or _provider is None:
        return _EMPTY_CONTEXT
    if carrier.get("traceparent") is None:
        return _EMPTY_CONTEXT
    return _PROPAGATOR.extract(carrier)


def traceparent_of(span: trace.Span) -> str:
    """``traceparent`` header value of ``span`` (for the response), or ``""`` for a non-recording one."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

"""Where finished spans go: a bounded in-memory queue, drained by one thread into a sink.

``Recorder.add`` is what the request path pays: a length check and a ``deque.append``, and, once
in a chunk of a few hundred spans, the chunk's export (inline for the file exporter, on a
background thread for the network ones: see :class:`Recorder`).

Sinks:

* ``JsonLinesSpanExporter``: the file exporter. Each line is one JSON object holding a resource
  and a chunk of its spans: ``{"resource": {...}, "schema": {...}, "rows": [...], "trees": [...],
  "spans": [...]}``. ``rows`` are span records and ``trees`` tree records (records.py) as positional
  arrays whose field names ``schema`` lists; ``spans`` are spans made through the SDK, as objects.
  Arrays rather than an object per span because the file exporter's cost is paid on the serving
  machine's CPUs: orjson writes a chunk of tuples with no Python code per span (~0.4 µs a span,
  against ~1.2 µs for building a dict per span), and a request's five worker spans are one array.
  ``hydraserve traces`` (``framework.traces_view.load_spans``) reads it back as span objects.
  Each chunk goes out in one ``write`` on an ``O_APPEND`` descriptor, so several processes append
  to one file without interleaving inside a line. It is also an SDK ``SpanExporter``, for other tracers.
* ``SdkSink``: any OpenTelemetry SDK exporter (OTLP over HTTP or gRPC, console, in-memory); records
  become ``ReadableSpan`` objects first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from framework.tracing.records import (
    ROW_LEN,
    SPAN_FIELDS,
    TREE_FIELDS,
    TREE_SPAN_FIELDS,
    SpanRecord,
    TreeRecord,
    exception_attributes,
    expand_tree,
    readable_span,
    sdk_span_dict,
)

__all__ = ["JsonLinesSpanExporter", "Recorder", "RecorderProcessor", "SdkSink"]

log = logging.getLogger("hydraserve.tracing")

CHUNK = 256  # spans converted per GIL-holding stretch of the exporting thread
_LINE = orjson.OPT_APPEND_NEWLINE
SCHEMA = {"rows": SPAN_FIELDS, "trees": TREE_FIELDS, "tree_spans": TREE_SPAN_FIELDS}
_SCHEMA_JSON = orjson.Fragment(orjson.dumps(SCHEMA))


def _json_default(obj: Any) -> Any:
    """What orjson cannot write by itself: a tuple subclass as an array, a failed span's exception
    as its event attributes, anything else as text."""
    if isinstance(obj, tuple):
        return tuple(obj)
    if isinstance(obj, BaseException):
        return exception_attributes(obj)
    return str(obj)


class JsonLinesSpanExporter(SpanExporter):
    """Writes spans as JSON lines, a chunk per line; takes records and SDK spans alike."""

    def __init__(self, path: str | os.PathLike, resource: Resource | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._write_lock = threading.Lock()
        self._resources: dict[int, tuple[Resource, Any]] = {}
        self._resource = self._resource_json(resource) if resource is not None else None

    def _resource_json(self, resource: Resource) -> Any:
        # The same object for every span of a process: serialized once and embedded as ready JSON.
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            cached = (resource, orjson.Fragment(orjson.dumps(dict(resource.attributes), default=str)))
            self._resources[id(resource)] = cached
        return cached[1]

    def encode(self, spans: Sequence[SpanRecord | TreeRecord | ReadableSpan]) -> bytes:
        """One line per resource in ``spans`` (records share this process's resource; SDK spans
        carry their own). A line per chunk, in one ``orjson.dumps`` call: the call itself is a good
        part of what serializing costs."""
        rows, trees, groups = [], [], {}
        for s in spans:
            if type(s) is tuple:  # a record (records.py): a row or a tree, by its length
                (rows if len(s) == ROW_LEN else trees).append(s)
            else:
                resource = self._resource_json(s.resource)
                groups.setdefault(id(resource), (resource, []))[1].append(sdk_span_dict(s))
        lines = []
        if rows or trees:
            lines.append(orjson.dumps({"resource": self._resource, "schema": _SCHEMA_JSON, "rows": rows,
                                       "trees": trees}, default=_json_default, option=_LINE))
        for resource, group in groups.values():
            lines.append(orjson.dumps({"resource": resource, "spans": group}, default=str, option=_LINE))
        return b"".join(lines)

    def export(self, spans: Sequence[SpanRecord | TreeRecord | ReadableSpan]) -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        try:
            data = self.encode(spans)
            with self._write_lock:
                view = memoryview(data)
                while view:  # a regular file takes it all at once; loop only for the pathological case
                    view = view[os.write(self._fd, view):]
        except Exception:  # an exporter never raises into its thread
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


class SdkSink:
    """Feeds an OpenTelemetry SDK exporter: records become ``ReadableSpan`` objects on the way."""

    def __init__(self, exporter: SpanExporter, resource: Resource, scope: InstrumentationScope) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = scope

    def export(self, spans: Sequence[SpanRecord | TreeRecord | ReadableSpan]) -> SpanExportResult:
        converted = []
        for s in spans:
            if type(s) is not tuple:  # made through the SDK
                converted.append(s)
            elif len(s) == ROW_LEN:
                converted.append(readable_span(SpanRecord._make(s), self.resource, self.scope))
            else:
                converted += [readable_span(r, self.resource, self.scope) for r in expand_tree(*s)]
        try:
            return self.exporter.export(converted)
        except Exception:  # a dead collector must not kill the exporting thread
            log.exception("tracing: export failed")
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.exporter.shutdown()


class Recorder:
    """The per-process span queue, and how it is drained: inline or by a thread.

    *Inline* (the file exporter): no thread. The thread that records the span that fills a chunk
    exports the chunk, and the process's main loop calls :meth:`flush_if_due` when it has time (the
    API process every ``flush_interval_ms`` on its event loop, a worker before it waits for work),
    so spans reach the file within about ``flush_interval_ms`` under any traffic. Measured on this
    project's 2-core machine, an exporting thread made every request of a saturated echo server
    cost ~40 µs more CPU than exporting inline (``benchmarks/tracing.py``): the thread's work itself is
    a few µs, so the rest is the two threads contending for the GIL and the CPUs.

    *Threaded* (OTLP and console, whose exports block on the network or a terminal): one daemon
    thread wakes every ``flush_interval_ms``, or as soon as a chunk is ready.
    """

    def __init__(self, sink: JsonLinesSpanExporter | SdkSink, max_queue_size: int, flush_interval_s: float,
                 inline: bool = False) -> None:
        self.sink = sink
        self.max_queue_size = max_queue_size
        self.flush_interval_s = flush_interval_s
        self.inline = inline
        self.dropped = 0
        self._queue: deque = deque()
        self._due = time.monotonic() + flush_interval_s  # when queued spans must be exported at the latest
        self._wake = threading.Event()
        self._stop = False
        self._export_lock = threading.Lock()  # one drain at a time: the thread, or a flush() caller
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name="hydraserve-span-export", daemon=True)
            self._thread.start()

    def add(self, span: SpanRecord | TreeRecord | ReadableSpan) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self.dropped += 1  # never block a request on tracing
            return
        queue.append(span)
        if len(queue) >= CHUNK:
            if self.inline:
                self.flush()
            elif len(queue) == CHUNK:
                self._wake.set()

    def seconds_until_due(self) -> float | None:
        """How long queued spans may still wait (0: now); ``None`` when nothing is queued, or when
        the exporting thread keeps the time (threaded mode)."""
        if not self.inline or not self._queue:
            return None
        return max(0.0, self._due - time.monotonic())

    def flush_if_due(self) -> None:
        """Inline mode: export the queue if ``flush_interval_ms`` has passed since the last export
        (cheap otherwise). Threaded mode: nothing; a network export must never run on the caller's
        thread (the API process calls this on its event loop)."""
        if self.inline and self._queue and time.monotonic() >= self._due:
            self.flush()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Export everything queued so far (from any thread)."""
        queue = self._queue
        with self._export_lock:
            while queue:
                chunk = [queue.popleft() for _ in range(min(CHUNK, len(queue)))]
                self.sink.export(chunk)
            self._due = time.monotonic() + self.flush_interval_s
        if self.dropped:
            log.warning("tracing: %d spans dropped (tracing.max_queue_size=%d is full)",
                        self.dropped, self.max_queue_size)
            self.dropped = 0

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.flush()
        self.sink.shutdown()


class RecorderProcessor(SpanProcessor):
    """Puts spans made through the OpenTelemetry SDK (``tracing.tracer()``) in the same queue."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self.recorder.add(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.recorder.flush()
        return True

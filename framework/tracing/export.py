"""Where finished spans go: bounded in-memory queues, drained in chunks into a sink.

What the request path pays is a ``deque.append`` and a length check on one of the recorder's
queues (``rows``, ``trees``: see records.py), written in line where spans are recorded, and, once
in a chunk of a few hundred spans, the chunk's export (inline for the file exporter, on a
background thread for the network ones: see :class:`Recorder`). One queue per kind of record, so
neither the queueing nor the export sorts them one by one in Python.

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
from itertools import repeat
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

    def encode(self, rows: Sequence[tuple] = (), trees: Sequence[tuple] = (),
               sdk_spans: Sequence[ReadableSpan] = ()) -> bytes:
        """One line for this process's records (they share its resource) and one per resource among
        ``sdk_spans`` (each carries its own). Each line is one ``orjson.dumps`` call over whole
        lists: no Python code runs per record."""
        lines = []
        if rows or trees:
            lines.append(orjson.dumps({"resource": self._resource, "schema": _SCHEMA_JSON, "rows": rows,
                                       "trees": trees}, default=_json_default, option=_LINE))
        groups: dict[int, tuple[Any, list]] = {}
        for s in sdk_spans:
            resource = self._resource_json(s.resource)
            groups.setdefault(id(resource), (resource, []))[1].append(sdk_span_dict(s))
        for resource, group in groups.values():
            lines.append(orjson.dumps({"resource": resource, "spans": group}, default=str, option=_LINE))
        return b"".join(lines)

    def write(self, rows: Sequence[tuple], trees: Sequence[tuple], sdk_spans: Sequence[ReadableSpan]) -> None:
        """What the recorder calls with each chunk (see :class:`Recorder`)."""
        self._write(rows, trees, sdk_spans)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """The SDK exporter interface, for spans of other tracers."""
        return self._write((), (), spans)

    def _write(self, rows: Sequence[tuple], trees: Sequence[tuple], sdk_spans: Sequence[ReadableSpan]) \
            -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        try:  # encoding too: in the file exporter this runs on a request's own path
            data = self.encode(rows, trees, sdk_spans)
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

    def write(self, rows: Sequence[tuple], trees: Sequence[tuple], sdk_spans: Sequence[ReadableSpan]) -> None:
        converted = list(sdk_spans)
        converted += [readable_span(SpanRecord._make(r), self.resource, self.scope) for r in rows]
        for t in trees:
            converted += [readable_span(r, self.resource, self.scope) for r in expand_tree(*t)]
        try:
            self.exporter.export(converted)
        except Exception:  # a dead collector must not kill the exporting thread
            log.exception("tracing: export failed")

    def shutdown(self) -> None:
        self.exporter.shutdown()


_popleft = deque.popleft


def _take(queue: deque) -> list:
    """Up to a chunk of ``queue``'s oldest entries, popped one by one in C (appends from another
    thread meanwhile are safe: each ``popleft`` is atomic)."""
    return list(map(_popleft, repeat(queue, min(CHUNK, len(queue)))))


class Recorder:
    """The per-process span queues, and how they are drained: inline or by a thread.

    Three queues, one per kind of entry: ``rows`` (span records), ``trees`` (tree records) and
    ``sdk`` (spans made through the SDK). The request path appends to ``rows`` or ``trees`` itself,
    then calls :meth:`chunk_ready` once that queue holds :attr:`chunk` entries (see
    ``tracing.RequestSpan.end``).

    *Inline* (the file exporter): no thread. The thread that records the span that fills a chunk
    exports the chunk, and the process's main loop calls :meth:`flush_if_due` when it has time (the
    API process every ``flush_interval_ms`` on its event loop, a worker before it waits for work),
    so spans reach the file within about ``flush_interval_ms`` under any traffic. Measured on this
    project's 2-core machine, an exporting thread made every request of a saturated echo server
    cost ~40 µs more CPU than exporting inline (``benchmarks/tracing.py``): the thread's work itself is
    a few µs, so the rest is the two threads contending for the GIL and the CPUs.

    *Threaded* (OTLP and console, whose exports block on the network or a terminal): one daemon
    thread wakes every ``flush_interval_ms``, or as soon as a chunk is ready. Past
    ``max_queue_size`` queued entries, new ones are dropped (and counted in a warning): a request
    never waits for tracing.
    """

    def __init__(self, sink: JsonLinesSpanExporter | SdkSink, max_queue_size: int, flush_interval_s: float,
                 inline: bool = False) -> None:
        self.sink = sink
        self.max_queue_size = max_queue_size
        # A queue this long is exported (inline) or handed to the thread: a chunk, or less when
        # tracing.max_queue_size is smaller, so the file exporter writes rather than drops.
        self.chunk = max(1, min(CHUNK, max_queue_size))
        self.flush_interval_s = flush_interval_s
        self.inline = inline
        self.dropped = 0
        self.rows: deque = deque()
        self.trees: deque = deque()
        self.sdk: deque = deque()
        self._due = time.monotonic() + flush_interval_s  # when queued spans must be exported at the latest
        self._wake = threading.Event()
        self._stop = False
        self._export_lock = threading.Lock()  # one drain at a time: the thread, or a flush() caller
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._run, name="hydraserve-span-export", daemon=True)
            self._thread.start()

    def add(self, span: SpanRecord | TreeRecord | ReadableSpan) -> None:
        """Queue any entry (the request path appends to its queue itself instead)."""
        if type(span) is not tuple:
            queue = self.sdk
        else:
            queue = self.rows if len(span) == ROW_LEN else self.trees
        queue.append(span)
        if len(queue) >= self.chunk:
            self.chunk_ready(queue)

    def queued(self) -> int:
        return len(self.rows) + len(self.trees) + len(self.sdk)

    def chunk_ready(self, queue: deque) -> None:
        """``queue`` holds at least :attr:`chunk` entries: export now (inline) or wake the exporting
        thread (and drop the newest entry when the thread is behind by ``max_queue_size``)."""
        if self.inline:
            self.flush()
        elif self.queued() > self.max_queue_size:
            queue.pop()  # the newest: tracing never blocks a request
            self.dropped += 1
        elif len(queue) == self.chunk:
            self._wake.set()

    def seconds_until_due(self) -> float | None:
        """How long queued spans may still wait (0: now); ``None`` when nothing is queued, or when
        the exporting thread keeps the time (threaded mode)."""
        if not self.inline or not (self.rows or self.trees or self.sdk):
            return None
        return max(0.0, self._due - time.monotonic())

    def flush_if_due(self) -> None:
        """Inline mode: export the queues if ``flush_interval_ms`` has passed since the last export
        (cheap otherwise). Threaded mode: nothing; a network export must never run on the caller's
        thread (the API process calls this on its event loop)."""
        if self.inline and (self.rows or self.trees or self.sdk) and time.monotonic() >= self._due:
            self.flush()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Export everything queued so far (from any thread)."""
        rows, trees, sdk = self.rows, self.trees, self.sdk
        with self._export_lock:
            while rows or trees or sdk:
                self.sink.write(_take(rows), _take(trees), _take(sdk))
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

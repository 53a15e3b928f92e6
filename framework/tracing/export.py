"""Where finished spans go: one queue per process, drained in chunks of OTLP/JSON into a sink.

The request path appends a span's bytes (``otlp.py``) to :attr:`Exporter.queue` and, once it holds
a chunk, calls :meth:`Exporter.full`. Draining a chunk joins its entries inside a ``TracesData``
(:meth:`Exporter.encode`) and sends those bytes: to ``file`` as one line of ``traces.jsonl`` (one
``write`` on an ``O_APPEND`` descriptor, so processes sharing the file never interleave inside a
line; what the Collector's ``otlpjsonfile`` receiver reads); to ``otlp`` over ``http/json`` as the
body of a POST to ``/v1/traces``; over ``http/protobuf`` or ``grpc`` converted first, on the
exporter's thread; to ``console`` as a line on stdout.

Who drains: the file is written by the thread that fills a chunk (a write of a few KB: a thread
woken for each chunk made every request of a saturated ``echo`` server cost ~40 µs more CPU on a
2-core machine, in GIL hand-offs). The network and console may block, so only the exporter's own
thread sends to them, woken by a full chunk; it then sends full chunks only, so a busy server's
POSTs stay a chunk each. That thread also drains what is queued every
``tracing.flush_interval_ms``, so spans leave under light traffic without the serving loops
asking. Past ``tracing.max_queue_size`` queued entries (a collector down or slow) new spans are
dropped and counted (``hydraserve_spans_dropped_total``): a request never waits for tracing.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from framework import metrics
from framework.tracing.otlp import attributes, sdk_span

__all__ = ["CHUNK", "Exporter", "FileSink", "GrpcSink", "HttpSink", "JsonLinesSpanExporter", "StreamSink",
           "resource_json"]

log = logging.getLogger("hydraserve.tracing")

CHUNK = 256  # queue entries (a worker's spans of one request count once) per line / request
_popleft = deque.popleft


def resource_json(resource: Mapping[str, Any], scope: str, version: str) -> bytes:
    """The head of every chunk this process sends, up to its spans (encoded once: :meth:`Exporter.encode`
    closes it around each chunk's spans)."""
    return b'{"resourceSpans":[{"resource":%s,"scopeSpans":[{"scope":%s,"spans":' % (
        orjson.dumps({"attributes": attributes(resource)}), orjson.dumps({"name": scope, "version": version}))


def _count(entry: bytes) -> int:
    """Spans in a queue entry (a worker's entry holds several)."""
    return entry.count(b'"spanId"')


class FileSink:
    """Appends each chunk as one line; ``path``'s folder is created."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def send(self, body: bytes) -> bool:
        if self._fd is None:
            return False
        view = memoryview(body)
        while view:  # a regular file takes it all at once; loop only for the pathological case
            view = view[os.write(self._fd, view):]
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StreamSink:
    """Writes each chunk to stdout (looked up at each write: tests and the CLI swap it)."""

    def send(self, body: bytes) -> bool:
        sys.stdout.write(body.decode())
        sys.stdout.flush()
        return True

    def close(self) -> None:
        pass


class HttpSink:
    """OTLP/HTTP on one kept-alive connection (``http.client``: no SDK). ``http/json`` sends the chunk's
    bytes as they are; ``http/protobuf`` converts them first (:func:`to_protobuf`)."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float, protobuf: bool = False) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"tracing.endpoint: must be an http:// or https:// URL, got '{endpoint}'")
        self._conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._address = (url.hostname, url.port)
        self.path = (url.path or "/v1/traces") + (f"?{url.query}" if url.query else "")
        self.protobuf = protobuf
        content_type = "application/x-protobuf" if protobuf else "application/json"
        self.headers = {**headers, "Content-Type": content_type}
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def send(self, body: bytes) -> bool:
        if self.protobuf:
            body = to_protobuf(body).SerializeToString()
        for attempt in range(2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._conn_class(*self._address, timeout=self.timeout_s)
            try:
                self._conn.request("POST", self.path, body, self.headers)
                response = self._conn.getresponse()
                response.read()
                if 200 <= response.status < 300:
                    return True
                log.warning("tracing: the collector answered %d to %d bytes of spans", response.status, len(body))
                return False
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # A kept-alive connection the collector closed meanwhile fails at once: retry on a new
                # one. A timeout is not retried: a slow collector costs spans, not twice the wait.
                if attempt or not reused or isinstance(exc, TimeoutError):
                    return False
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _hex_ids(message: Any) -> None:
    # json_format reads bytes fields as base64, OTLP/JSON writes ids as hex: 32 and 16 hex digits are
    # valid base64 (of 24 and 12 bytes), so encoding those back gives the hex text to decode.
    for field in ("trace_id", "span_id", "parent_span_id"):
        raw = getattr(message, field)
        if raw:
            setattr(message, field, bytes.fromhex(base64.b64encode(raw).decode()))


def to_protobuf(body: bytes) -> Any:
    """A chunk's OTLP/JSON as an ``ExportTraceServiceRequest`` (the same fields as ``TracesData``)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = json_format.Parse(body, ExportTraceServiceRequest())
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                _hex_ids(span)
                for link in span.links:
                    _hex_ids(link)
    return request


class GrpcSink:
    """OTLP/gRPC: each chunk converted (:func:`to_protobuf`) on the exporter's thread."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float) -> None:
        import grpc  # imported here: a server without gRPC export never loads it
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        url = urlsplit(endpoint)
        target = url.netloc if "://" in endpoint else endpoint
        self._channel = grpc.insecure_channel(target) if url.scheme == "http" else \
            grpc.secure_channel(target, grpc.ssl_channel_credentials())
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._error = grpc.RpcError
        self.metadata = [(str(k).lower(), str(v)) for k, v in headers.items()]
        self.timeout_s = timeout_s

    def send(self, body: bytes) -> bool:
        try:
            self._stub.Export(to_protobuf(body), timeout=self.timeout_s, metadata=self.metadata or None)
        except self._error as exc:
            log.debug("tracing: gRPC export failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        self._channel.close()


class Exporter:
    """This process's span queue, its draining (see the module docstring) and its thread."""

    def __init__(self, sink: Any, head: bytes, max_queue_size: int, flush_interval_s: float, inline: bool) -> None:
        self.sink = sink
        self.head = head
        self.queue: deque = deque()
        # A queue this long is drained (inline) or handed to the thread: a chunk, or less when
        # tracing.max_queue_size is smaller, so the file is written rather than spans dropped.
        self.chunk = max(1, min(CHUNK, max_queue_size))
        self.max_queue_size = max_queue_size
        self.flush_interval_s = flush_interval_s
        self.inline = inline
        self.dropped = 0  # since the last warning
        self._warned_at = 0.0
        self._lock = threading.Lock()  # one drain at a time
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hydraserve-span-export", daemon=True)
        self._thread.start()

    def add(self, span: bytes) -> None:
        """Queue encoded spans (``otlp.py``). The request path does this in line."""
        queue = self.queue
        queue.append(span)
        if len(queue) >= self.chunk:
            self.full()

    def full(self) -> None:
        """The queue holds at least a chunk: drain it here (file) or wake the thread (network)."""
        queue = self.queue
        if self.inline:
            if self._lock.acquire(blocking=False):  # else the thread is draining: it takes these too
                try:
                    self._drain()
                finally:
                    self._lock.release()
        elif len(queue) > self.max_queue_size:
            self._drop([queue.pop()])  # the newest: tracing never blocks a request
        elif len(queue) == self.chunk:
            self._wake.set()

    def encode(self, entries: Sequence[bytes]) -> bytes:
        """One OTLP/JSON ``TracesData`` line: this process's resource, its scope, and ``entries``."""
        return b"%s[%s]}]}]}\n" % (self.head, b",".join(entries))

    def _drain(self, floor: int = 1) -> None:
        """Send what is queued while at least ``floor`` entries are (a chunk: only full ones)."""
        queue = self.queue
        while len(queue) >= floor:
            entries = list(map(_popleft, repeat(queue, min(CHUNK, len(queue)))))
            try:
                sent = self.sink.send(self.encode(entries))
            except Exception:  # a broken sink or span must never raise into a request
                log.exception("tracing: cannot export %d spans", len(entries))
                sent = False
            if not sent:
                self._drop(entries)

    def _drop(self, entries: Sequence[Any]) -> None:
        n = sum(map(_count, entries))
        metrics.spans_dropped(n)
        self.dropped += n
        now = time.monotonic()
        if now - self._warned_at >= 60:  # a collector that stays down warns once a minute, not per chunk
            log.warning("tracing: %d spans dropped (the exporter failed or tracing.max_queue_size=%d is full)",
                        self.dropped, self.max_queue_size)
            self._warned_at, self.dropped = now, 0

    def _run(self) -> None:
        while not self._stop:
            woken = self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            # Woken by a full chunk: send full chunks only. Sending the few spans that arrived during
            # the last POST's round trip as well made a saturated server's POSTs small and many
            # (each one's HTTP and thread hand-off cost shared by a few requests); the rest waits
            # for the next full chunk or the interval.
            with self._lock:
                self._drain(self.chunk if woken else 1)

    def flush(self) -> None:
        """Export everything queued so far (any thread; the caller waits for the sink)."""
        with self._lock:
            self._drain()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        self.sink.close()


class JsonLinesSpanExporter:
    """An OpenTelemetry SDK ``SpanExporter`` writing the same lines, for a client's own tracer
    (``examples/traced_client.py``): ``hydraserve traces`` reads its spans with the server's."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._sink, self._lock = FileSink(path), threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            for s in spans:  # a line per span, with its resource and scope: a client exports a few
                scope = s.instrumentation_scope
                head = resource_json(dict(s.resource.attributes), getattr(scope, "name", ""),
                                     getattr(scope, "version", None) or "")
                self._sink.send(b"%s[%s]}]}]}\n" % (head, sdk_span(s)))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._sink.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is a write(2): nothing is buffered here

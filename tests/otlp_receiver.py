"""A tiny OTLP receiver for tests and benchmarks: collects exported spans in memory.

``OtlpHttpReceiver`` listens on 127.0.0.1 (random port) for OTLP/HTTP on ``/v1/traces``, protobuf
or JSON (``Content-Type: application/json``: parsed as strictly as a collector does, unknown
fields refused with 400); ``OtlpGrpcReceiver`` serves the OTLP gRPC TraceService. Both turn spans
into the flat dicts ``hydraserve traces`` reads (hex ids, ``kind`` names, attribute dicts)::

    with OtlpHttpReceiver() as rx:
        init_tracing(TracingConfig(exporter="otlp", endpoint=rx.endpoint), {}, None)
        ...
        spans = rx.wait_for(3)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

_KINDS = {v: k.removeprefix("SPAN_KIND_") for k, v in Span.SpanKind.items()}
_STATUS = {v: k.removeprefix("STATUS_CODE_") for k, v in Status.StatusCode.items()}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def _attrs(kvs) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Flatten a request into span dicts (with their resource's attributes)."""
    out = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex() or None,
                    "name": s.name,
                    "kind": _KINDS.get(s.kind, str(s.kind)),
                    "start_ns": s.start_time_unix_nano,
                    "end_ns": s.end_time_unix_nano,
                    "attributes": _attrs(s.attributes),
                    "status": {"code": _STATUS.get(s.status.code, str(s.status.code)),
                               "description": s.status.message or None},
                    "events": [{"name": e.name, "time_ns": e.time_unix_nano,
                                "attributes": _attrs(e.attributes)} for e in s.events],
                    "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                               "attributes": _attrs(ln.attributes)} for ln in s.links],
                    "resource": resource,
                    "scope": ss.scope.name,
                })
    return out


class _Collector:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []  # request headers (or gRPC metadata) of each export
        self._cond = threading.Condition()

    def _add(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        spans = decode(request)
        with self._cond:
            self.requests += 1
            self.headers.append(headers)
            self.spans.extend(spans)
            self._cond.notify_all()

    def _add_json(self, body: bytes, headers: dict[str, str]) -> None:
        from google.protobuf import json_format

        from framework.traces_view import spans_of_traces_data

        json_format.Parse(body, ExportTraceServiceRequest(), ignore_unknown_fields=False)  # raises: a 400
        spans = spans_of_traces_data(orjson.loads(body))
        with self._cond:
            self.requests += 1
            self.headers.append(headers)
            self.spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``n`` spans arrived (or ``timeout``); returns all spans so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.spans)

    def clear(self) -> None:
        with self._cond:
            self.spans.clear()
            self.headers.clear()
            self.requests = 0


class OtlpHttpReceiver(_Collector):
    """OTLP/HTTP protobuf receiver; ``endpoint`` is the URL to give the exporter."""

    def __init__(self, path: str = "/v1/traces", keep_raw: bool = False) -> None:
        """``keep_raw``: store request bodies undecoded (``raw_bodies``) for a cheap collector."""
        super().__init__()
        collector = self
        self.raw_bodies: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's requests.Session expects

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != path:
                    self._reply(404, b"")
                    return
                is_json = (self.headers.get("Content-Type") or "").startswith("application/json")
                if keep_raw:
                    collector.raw_bodies.append((is_json, body))
                    self._reply(200, b"")
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    if is_json:
                        collector._add_json(body, headers)
                    else:
                        request = ExportTraceServiceRequest()
                        request.ParseFromString(body)
                        collector._add(request, headers)
                except Exception:
                    self._reply(400, b"")
                    return
                self._reply(200, ExportTraceServiceResponse().SerializeToString())

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-rx", daemon=True)

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class OtlpGrpcReceiver(_Collector):
    """OTLP gRPC receiver; ``endpoint`` is ``http://127.0.0.1:PORT`` (plain text, no path)."""

    def __init__(self) -> None:
        super().__init__()
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        collector = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (generated name)
                collector._add(request, {k: str(v) for k, v in context.invocation_metadata()})
                return ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.stop(grace=None)


def count_spans(bodies: list[tuple[bool, bytes]]) -> int:
    """Spans in ``(is_json, body)`` pairs as ``keep_raw`` stores them."""
    from framework.traces_view import spans_of_traces_data

    total = 0
    for is_json, body in bodies:
        if is_json:
            total += len(spans_of_traces_data(orjson.loads(body)))
            continue
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return total


def _main() -> None:
    """``python tests/otlp_receiver.py [--count]``: a receiver in its own process.

    Prints ``endpoint <url>`` first. Without ``--count`` each span is printed as it arrives; with it
    bodies are only kept, and decoded at exit (SIGINT/SIGTERM) into ``spans <n>`` and ``posts <n>``, so that a
    benchmark's collector spends next to no CPU while the server under test is measured.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--count", action="store_true", help="count spans at exit instead of printing them")
    args = parser.parse_args()

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with OtlpHttpReceiver(keep_raw=args.count) as rx:
        print(f"endpoint {rx.endpoint}", flush=True)
        seen = 0
        try:
            while True:
                if args.count:
                    time.sleep(1.0)
                    continue
                spans = rx.wait_for(seen + 1, timeout=1.0)
                for s in spans[seen:]:
                    ms = (s["end_ns"] - s["start_ns"]) / 1e6
                    print(s["trace_id"], s["name"], f"{ms:.3f} ms", flush=True)
                seen = len(spans)
        except KeyboardInterrupt:
            pass
    if args.count:
        print(f"spans {count_spans(rx.raw_bodies)}", flush=True)
        print(f"posts {len(rx.raw_bodies)}", flush=True)


if __name__ == "__main__":
    _main()

"""Tracing, metrics and the trace viewer, without a server (the end-to-end HTTP tests are elsewhere).

What a user relies on: spans land in the file / collector with their parent links and attributes, as
OTLP/JSON any OpenTelemetry tool reads (every line parses as a ``TracesData``, unknown fields refused),
one trace id survives the trip through a queued message, ``sample_ratio: 0`` records nothing,
``/metrics`` sums every process, and ``hydraserve traces`` draws a waterfall of the slowest request.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from prometheus_client.parser import text_string_to_metric_families

from framework import metrics, traces_view, tracing
from framework.settings import TracingConfig
from framework.tracing import exception_attributes, otlp
from framework.worker import Pending, _parse, record_spans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver  # noqa: E402

FORK = multiprocessing.get_context("fork")
RESOURCE = {"model": "echo", "quantization": "none", "batching": "none", "cache": "none", "hardware": "cpu"}


@pytest.fixture(autouse=True)
def _clean_tracing():
    tracing.shutdown()
    yield
    tracing.shutdown()


def read_lines(path: Path) -> list[dict]:
    """Every span in the file, each with its resource: every line must be an OTLP/JSON ``TracesData``
    as the OpenTelemetry protobuf definitions read it (no unknown field, every type right)."""
    spans = []
    for line in path.read_bytes().splitlines():
        json_format.Parse(line, TracesData(), ignore_unknown_fields=False)
        spans += traces_view.spans_of_line(line)
    return spans


def make_request_trace(name: str = "POST /predict") -> str:
    """What the server does: a SERVER span, a cache lookup, and the worker's spans, recorded as one
    tree under the request's span that the request frame named (here in one process)."""
    span = tracing.start_request(name, {}, {"http.route": "/predict"})
    t0 = time.time_ns()
    tracing.record("cache.lookup", tracing.current(), t0, t0 + 1000, {"cache.result": "miss"})
    batch = tracing.encode_spans([("batch", t0, t0 + 9000, {"batch.size": 4}, -1, None),
                                  ("model.forward", t0 + 1000, t0 + 5000, {"batch.size": 4, "shape": [4, 8]}, 0, None)])
    start_mono = time.monotonic()
    queued = Pending("1", "api-1", [1], start_mono - 0.002, start_mono + 1, tracing.sampled_current())
    record_spans(batch, queued, start_mono, t0)
    span.end(200)
    return span.ref.trace_id


# ------------------------------------------------------------------------------------------ exporters


def test_file_exporter_writes_the_request_tree_as_json_lines(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    assert tracing.enabled()
    trace_id = make_request_trace()
    tracing.shutdown()

    spans = read_lines(tmp_path / "traces.jsonl")  # relative path: under the output folder
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"POST /predict", "cache.lookup", "queue.wait", "batch", "model.forward"}
    assert {s["trace_id"] for s in spans} == {trace_id}
    root = by_name["POST /predict"]
    assert root["kind"] == "SERVER" and root["parent_span_id"] is None
    assert by_name["cache.lookup"]["parent_span_id"] == root["span_id"]
    assert by_name["cache.lookup"]["attributes"] == {"cache.result": "miss"}
    assert by_name["batch"]["parent_span_id"] == root["span_id"]
    assert by_name["model.forward"]["parent_span_id"] == by_name["batch"]["span_id"]
    assert by_name["queue.wait"]["parent_span_id"] == root["span_id"]
    assert by_name["queue.wait"]["end_ns"] - by_name["queue.wait"]["start_ns"] == 2_000_000
    assert by_name["batch"]["attributes"] == {"batch.size": 4}
    assert by_name["model.forward"]["attributes"] == {"batch.size": 4, "shape": [4, 8]}
    assert by_name["model.forward"]["resource"] == root["resource"]
    assert root["attributes"] == {"http.route": "/predict", "http.response.status_code": 200}
    assert root["end_ns"] >= root["start_ns"] > 0
    assert root["status"]["code"] == "UNSET"
    resource = root["resource"]
    assert resource["service.name"] == "hydraserve" and resource["service.version"]
    assert {k: resource[k] for k in RESOURCE} == RESOURCE
    assert len({s["span_id"] for s in spans}) == len(spans)  # every span has its own id


@pytest.mark.parametrize("start_mono", [1000.0, 2369.9863, 86_400.125, time.monotonic()])
@pytest.mark.parametrize("wait_s", [0.002, 0.000_001, 1.5])
def test_queue_wait_is_exact_in_whole_nanoseconds_at_any_clock_value(start_mono, wait_s, monkeypatch):
    """Seconds on the monotonic clock become nanoseconds by rounding: int() of 0.002 s read at
    1000.0 s gave 1,999,999 ns (and made the file exporter test above fail now and then)."""
    recorded = []
    monkeypatch.setattr(tracing, "record_tree", lambda parent, spans: recorded.append(spans))
    queued = Pending("1", "api-1", [1], start_mono - wait_s, start_mono + 1, tracing.SpanRef("ab" * 16, "cd" * 8, True))
    record_spans(tracing.encode_spans([("batch", 1, 2, {}, -1, None)]), queued, start_mono, 10**18)
    wait = orjson.loads(b"[%s]" % otlp.fill(recorded[0], "ab" * 16, "cd" * 8, None))[-1]
    start_ns, end_ns = int(wait["startTimeUnixNano"]), int(wait["endTimeUnixNano"])
    assert wait["name"] == "queue.wait" and end_ns - start_ns == round(wait_s * 1e9)


def test_init_is_idempotent_and_absolute_paths_are_kept(tmp_path):
    path = tmp_path / "elsewhere" / "t.jsonl"
    cfg = TracingConfig(exporter="file", path=str(path))
    tracing.init_tracing(cfg, RESOURCE, "/nonexistent-output-dir")
    tracing.init_tracing(cfg, RESOURCE, "/nonexistent-output-dir")  # no second setup, no duplicates
    tracing.start_request("once", None, {}).end(200)
    tracing.shutdown()
    assert [s["name"] for s in read_lines(path)] == ["once"]


def test_sdk_spans_join_the_same_file_under_a_request(tmp_path):
    # Plugin code may use the OpenTelemetry SDK: its spans land next to the framework's, parented.
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    request = tracing.start_request("POST /predict", {}, {})
    with tracing.tracer().start_as_current_span("my.step", context=tracing.context_of(tracing.current()),
                                                attributes={"items": 4}):
        pass
    request.end(200)
    tracing.shutdown()
    spans = {s["name"]: s for s in read_lines(tmp_path / "traces.jsonl")}
    assert spans["my.step"]["trace_id"] == spans["POST /predict"]["trace_id"]
    assert spans["my.step"]["parent_span_id"] == spans["POST /predict"]["span_id"]
    assert spans["my.step"]["attributes"] == {"items": 4}
    assert spans["my.step"]["resource"]["model"] == "echo"


@pytest.mark.parametrize(
    ("receiver", "protocol"),
    [(OtlpHttpReceiver, "http/json"), (OtlpHttpReceiver, "http/protobuf"), (OtlpGrpcReceiver, "grpc")],
)
def test_otlp_exporter_sends_the_same_trace_to_a_collector(receiver, protocol):
    with receiver() as rx:
        cfg = TracingConfig(exporter="otlp", endpoint=rx.endpoint, protocol=protocol,
                            headers={"x-tenant": "team-a"}, timeout_s=5.0)
        assert cfg.problems() == []
        tracing.init_tracing(cfg, RESOURCE, None)
        trace_id = make_request_trace()
        tracing.shutdown()  # flushes
        spans = rx.wait_for(5, timeout=10)
        assert rx.headers and rx.headers[0].get("x-tenant") == "team-a"
        if protocol == "http/json":  # the file's bytes, as they are
            assert rx.headers[0]["content-type"] == "application/json"
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"POST /predict", "cache.lookup", "queue.wait", "batch", "model.forward"}
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert by_name["POST /predict"]["kind"] == "SERVER"
    assert by_name["batch"]["parent_span_id"] == by_name["POST /predict"]["span_id"]
    assert by_name["batch"]["attributes"] == {"batch.size": 4}
    assert by_name["batch"]["resource"]["model"] == "echo"
    assert by_name["model.forward"]["parent_span_id"] == by_name["batch"]["span_id"]
    assert by_name["model.forward"]["attributes"] == {"batch.size": 4, "shape": [4, 8]}
    assert by_name["model.forward"]["resource"]["model"] == "echo"


def test_spans_reach_the_file_under_light_traffic_without_anyone_asking(tmp_path):
    # The exporter's own thread keeps the time: no serving loop calls a flush.
    tracing.init_tracing(TracingConfig(exporter="file", flush_interval_ms=20), RESOURCE, str(tmp_path))
    path = tmp_path / "traces.jsonl"
    tracing.start_request("light traffic", None, {}).end(200)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (path.exists() and read_lines(path)):
        time.sleep(0.02)
    assert [s["name"] for s in read_lines(path)] == ["light traffic"]


def test_a_full_chunk_is_written_by_the_request_that_fills_it(tmp_path):
    from framework.tracing.export import CHUNK

    tracing.init_tracing(TracingConfig(exporter="file", flush_interval_ms=3_600_000), RESOURCE, str(tmp_path))
    for _ in range(CHUNK):  # the thread sleeps for an hour: only the requests themselves can write
        tracing.start_request("busy", None, {}).end(200)
    assert [s["name"] for s in read_lines(tmp_path / "traces.jsonl")].count("busy") == CHUNK


def test_requests_never_send_to_the_network_themselves(monkeypatch):
    import threading

    with OtlpHttpReceiver() as rx:
        tracing.init_tracing(TracingConfig(exporter="otlp", endpoint=rx.endpoint, flush_interval_ms=3_600_000),
                             RESOURCE, None)
        exporter = tracing._state.exporter
        senders = []
        real_send = exporter.sink.send
        monkeypatch.setattr(exporter.sink, "send", lambda body: senders.append(threading.current_thread().name)
                            or real_send(body))
        from framework.tracing.export import CHUNK

        for _ in range(CHUNK):  # a full chunk wakes the exporter's thread
            tracing.start_request("r", None, {}).end(200)
        assert len(rx.wait_for(CHUNK, timeout=30)) == CHUNK
        assert set(senders) == {"hydraserve-span-export"}


def test_a_busy_server_posts_full_chunks_not_what_arrived_during_the_last_post(monkeypatch):
    # Under saturation spans keep arriving while a POST waits for the collector. Sending those at
    # once made many small POSTs (4x as many on benchmarks/tracing.py's echo server), each one's
    # HTTP and thread hand-off shared by a few requests.
    import threading

    from framework.tracing.export import CHUNK

    with OtlpHttpReceiver() as rx:
        tracing.init_tracing(TracingConfig(exporter="otlp", endpoint=rx.endpoint, flush_interval_ms=3_600_000),
                             RESOURCE, None)
        exporter = tracing._state.exporter
        sending, sizes = threading.Event(), []
        real_send = exporter.sink.send

        def slow_send(body: bytes) -> bool:
            sending.set()
            sizes.append(body.count(b'"spanId"'))
            time.sleep(0.3)  # a collector that takes its time
            return real_send(body)

        monkeypatch.setattr(exporter.sink, "send", slow_send)
        for _ in range(CHUNK):
            tracing.start_request("r", None, {}).end(200)
        assert sending.wait(30)
        for _ in range(CHUNK // 2):  # arrive during the POST
            tracing.start_request("r", None, {}).end(200)
        rx.wait_for(CHUNK, timeout=30)
        time.sleep(0.5)
        assert sizes == [CHUNK]  # the half chunk waits for the next full one (or the interval)
        for _ in range(CHUNK // 2):
            tracing.start_request("r", None, {}).end(200)
        assert len(rx.wait_for(2 * CHUNK, timeout=30)) == 2 * CHUNK
        assert sizes == [CHUNK, CHUNK]


def test_console_exporter_prints_spans(capsys):
    tracing.init_tracing(TracingConfig(exporter="console"), RESOURCE, None)
    tracing.start_request("printed", None, {}).end(200)
    tracing.shutdown()
    (line,) = capsys.readouterr().out.splitlines()  # one OTLP/JSON line, as the file holds
    assert [s["name"] for s in traces_view.spans_of_line(line.encode())] == ["printed"]


def test_exporter_none_builds_nothing_and_costs_nothing(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="none"), RESOURCE, str(tmp_path))
    assert not tracing.enabled()
    assert tracing.start_request("ignored", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, {}) is None
    assert tracing.carrier() is None and tracing.current() is None
    assert tracing.record("ignored", tracing.parse_traceparent({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                                                 + "-01"}), 1, 2) is None
    with tracing.tracer().start_as_current_span("ignored") as span:
        assert not span.is_recording()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- propagation


def test_client_traceparent_is_continued_and_tracestate_travels_on(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "v=1"}
    span = tracing.start_request("server", incoming, {})
    header = span.ref.traceparent()
    assert re.fullmatch(r"00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01", header)
    assert span.header == header.encode()  # the response header the server sends
    assert tracing.carrier() == {"traceparent": header, "tracestate": "v=1"}  # vendor state travels on
    span.end(200)
    assert tracing.current() is None  # ended: no longer current
    tracing.shutdown()
    (line,) = read_lines(tmp_path / "traces.jsonl")
    assert line["parent_span_id"] == "00f067aa0ba902b7" and line["trace_state"] == "v=1"


@pytest.mark.parametrize("header", [
    None, "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16
    + "-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
])
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(tmp_path, header):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    span = tracing.start_request("root", {"traceparent": header} if header else {}, {})
    assert span.parent is None and span.ref.sampled
    assert span.ref.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"
    span.end(200)


def test_parse_traceparent_agrees_with_the_opentelemetry_propagator(tmp_path):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    propagator = TraceContextTextMapPropagator()
    for header in ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                   "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-future", "00-abc-def-01",
                   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"):
        theirs = trace.get_current_span(propagator.extract({"traceparent": header})).get_span_context()
        ours = tracing.parse_traceparent({"traceparent": header})
        # What the server passes: an ASGI scope's raw header list.
        request = tracing.start_request("raw", [(b"host", b"x"), (b"traceparent", header.encode()),
                                                (b"tracestate", b"v=1")], {})
        request.end(200)
        raw = request.parent
        assert (ours is not None) == theirs.is_valid == (raw is not None), header
        if raw is not None:  # an ASGI scope's raw headers read the same, tracestate included
            assert (raw.trace_id, raw.span_id, raw.sampled, raw.trace_state) == \
                (ours.trace_id, ours.span_id, ours.sampled, "v=1")
        if ours is not None:
            assert int(ours.trace_id, 16) == theirs.trace_id and int(ours.span_id, 16) == theirs.span_id
            assert ours.sampled == theirs.trace_flags.sampled


def test_record_tree_nests_spans_given_as_entries_or_as_json(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    request = tracing.start_request("POST /predict", {}, {})
    assert tracing.sampled_current() is request.ref
    t0 = time.time_ns()
    tracing.record_tree(request.ref, [("batch", t0, t0 + 10, {"batch.size": 2}, -1, RuntimeError("boom")),
                                      ("model.forward", t0 + 2, t0 + 8, None, 0, None)])
    # The same kind of tree as a worker sends it: JSON, an error as its exception's attributes.
    tracing.record_tree(request.ref, tracing.encode_spans([
        ("queue.wait", t0 - 5, t0, None, -1, None),
        ("json.batch", t0, t0 + 10, None, -1, exception_attributes(ValueError("bad"))),
        ("json.child", t0 + 1, t0 + 9, {"k": [1, 2], "note": "100% %(t)s %s"}, 1, None)]))
    tracing.record_tree(None, [("never", t0, t0 + 1, None, -1, None)])
    request.end(500)
    tracing.shutdown()
    spans = {s["name"]: s for s in read_lines(tmp_path / "traces.jsonl")}
    assert set(spans) == {"POST /predict", "batch", "model.forward", "queue.wait", "json.batch", "json.child"}
    root = spans["POST /predict"]
    for name in ("batch", "queue.wait", "json.batch"):
        assert spans[name]["parent_span_id"] == root["span_id"]
    assert spans["model.forward"]["parent_span_id"] == spans["batch"]["span_id"]
    assert spans["json.child"]["parent_span_id"] == spans["json.batch"]["span_id"]
    assert spans["json.child"]["attributes"] == {"k": [1, 2], "note": "100% %(t)s %s"}  # text kept as it was
    assert spans["batch"]["status"] == {"code": "ERROR", "description": "boom"}
    assert spans["batch"]["events"] == [{"name": "exception", "time_ns": t0 + 10, "attributes": {
        "exception.type": "RuntimeError", "exception.message": "boom"}}]
    assert spans["json.batch"]["status"] == {"code": "ERROR", "description": "bad"}
    assert spans["json.batch"]["events"][0]["attributes"]["exception.type"] == "ValueError"
    assert spans["model.forward"]["status"]["code"] == "UNSET" and not spans["model.forward"]["events"]
    assert len({s["span_id"] for s in spans.values()}) == 6
    assert {s["trace_id"] for s in spans.values()} == {root["trace_id"]}


def test_a_span_tree_encodes_what_encode_spans_does_and_each_call_gets_fresh_ids(monkeypatch):
    labels = {"model": "100% %(t)s", "ratio": 0.5, "on": True}
    tree = otlp.SpanTree([("batch %s", -1, {"batch.size": otlp.Slot(), "batch.id": otlp.Slot("7b%-")}),
                          ("model.forward", 0, {**labels, "batch.size": otlp.Slot()}), ("post", 0, None)])
    t0 = time.time_ns()
    values = (t0, t0 + 9, 3, 41, t0 + 1, t0 + 5, 3, t0 + 5, t0 + 8)
    entries = [("batch %s", t0, t0 + 9, {"batch.size": 3, "batch.id": "7b%-41"}, -1, None),
               ("model.forward", t0 + 1, t0 + 5, {**labels, "batch.size": 3}, 0, None),
               ("post", t0 + 5, t0 + 8, None, 0, None)]
    monkeypatch.setattr(otlp, "_getrandbits", lambda bits: 0xABCDEF)  # the same ids from both
    assert tree.encode(values) == otlp.encode_spans(entries)
    monkeypatch.undo()
    one, two = (orjson.loads(b"[%s]" % otlp.fill(tree.encode(values), "ab" * 16, "cd" * 8, None)) for _ in range(2))
    assert one[0]["parentSpanId"] == "cd" * 8 and one[1]["parentSpanId"] == one[0]["spanId"]
    assert one[0]["spanId"] != two[0]["spanId"]
    with pytest.raises(ValueError, match="entry 1's parent must be an earlier entry or -1"):
        otlp.SpanTree([("a", -1, None), ("b", 1, None)])


def test_the_worker_records_a_sampled_request_s_spans_under_its_span_and_drops_a_malformed_message(tmp_path):
    base = {"id": "a-1", "to": "1", "items": ["x"], "t": 100.0, "dl": 102.0}
    assert _parse(orjson.dumps(base)).parent is None  # not sampled: the worker records nothing
    queued = _parse(orjson.dumps({**base, "s": {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01", "tracestate": "v=1"}}))
    assert (queued.parent.trace_id, queued.parent.span_id, queued.parent.trace_state) == ("ab" * 16, "cd" * 8, "v=1")
    assert queued.arrival == 100.0
    assert _parse(orjson.dumps({**base, "t": "soon"})) is None  # never a crash in the worker's loop
    # Ids are written into the worker's spans as they are: anything but hex ids is no parent.
    forged = {"traceparent": f'00-ab"}},{{"x":"{"0" * 21}-{"cd" * 8}-01'}
    assert _parse(orjson.dumps({**base, "s": forged})).parent is None
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    # Queued 5 µs (monotonic clock) before the batch started at 10_000 ns (wall clock).
    record_spans(tracing.encode_spans([("batch", 10_000, 20_000, None, -1, None)]), queued, 100.000005, 10_000)
    tracing.shutdown()
    batch, wait = sorted(read_lines(tmp_path / "traces.jsonl"), key=lambda s: s["name"])
    assert (batch["name"], batch["start_ns"], batch["end_ns"]) == ("batch", 10_000, 20_000)
    assert wait["name"] == "queue.wait" and abs(wait["start_ns"] - 5_000) <= 1 and wait["end_ns"] == 10_000
    # Both under the request's span, in its trace, with its tracestate.
    assert wait["parent_span_id"] == batch["parent_span_id"] == "cd" * 8
    assert wait["trace_id"] == batch["trace_id"] == "ab" * 16 and batch["trace_state"] == "v=1"


def test_a_chunk_that_cannot_be_written_is_logged_and_counted_not_raised_into_the_request(tmp_path, caplog,
                                                                                           monkeypatch):
    tracing.init_tracing(TracingConfig(exporter="file", max_queue_size=2, flush_interval_ms=3_600_000), RESOURCE,
                         str(tmp_path))
    sink = tracing._state.exporter.sink

    def disk_full(body: bytes) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink, "send", disk_full)
    before = dropped_spans()
    request = tracing.start_request("POST /predict", {}, {})
    tracing.record("lost", request.ref, 1, 2, {"huge": 2**70})  # beyond 64 bits: kept as text
    request.end(200)  # fills the queue: this call writes the chunk, and must not fail
    assert "cannot export" in caplog.text and dropped_spans() - before == 2
    monkeypatch.undo()
    tracing.start_request("POST /predict", {}, {}).end(200)
    tracing.shutdown()
    assert [s["name"] for s in read_lines(tmp_path / "traces.jsonl")] == ["POST /predict"]  # later spans still land


def dropped_spans() -> float:
    return next(s.value for f in text_string_to_metric_families(metrics.render()[0].decode())
                for s in f.samples if s.name == "hydraserve_spans_dropped_total")


def test_record_follows_the_parent_sampling_and_marks_errors(tmp_path):
    sampled = tracing.parse_traceparent({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    unsampled = tracing.parse_traceparent({"traceparent": "00-" + "3" * 32 + "-" + "4" * 16 + "-00"})
    assert tracing.record("off", sampled, 1, 2) is None  # tracing off: nothing, no error
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    t0 = time.time_ns()
    batch = tracing.record("batch", sampled, t0, t0 + 10, {"batch.size": 2}, error=RuntimeError("model failure"))
    assert batch is not None and batch.trace_id == "1" * 32
    assert tracing.record("phase", batch, t0, t0 + 5) is not None
    assert tracing.record("dropped", unsampled, t0, t0 + 5) is None
    assert tracing.record("orphan", None, t0, t0 + 5) is None  # no parent: not part of any request
    tracing.shutdown()
    spans = {s["name"]: s for s in read_lines(tmp_path / "traces.jsonl")}
    assert set(spans) == {"batch", "phase"}
    assert spans["batch"]["parent_span_id"] == "2" * 16
    assert spans["batch"]["status"] == {"code": "ERROR", "description": "model failure"}
    assert spans["batch"]["events"][0]["attributes"]["exception.type"] == "RuntimeError"
    assert spans["phase"]["parent_span_id"] == spans["batch"]["span_id"]


def test_server_span_follows_http_conventions_for_errors(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    tracing.start_request("client error", None, {}).end(422)
    tracing.start_request("server error", None, {}).end(503)
    tracing.shutdown()
    spans = {s["name"]: s for s in read_lines(tmp_path / "traces.jsonl")}
    client_error = spans["client error"]
    assert client_error["status"]["code"] == "UNSET" and "error.type" not in client_error["attributes"]
    assert spans["server error"]["status"]["code"] == "ERROR"
    assert spans["server error"]["attributes"]["error.type"] == "503"


def test_sample_ratio_zero_records_nothing_but_honours_a_sampled_parent(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file", sample_ratio=0.0), RESOURCE, str(tmp_path))
    for _ in range(20):
        make_request_trace()
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    tracing.start_request("sampled upstream", incoming, {}).end(200)
    unsampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
    span = tracing.start_request("unsampled upstream", unsampled, {})
    assert tracing.carrier() is None and tracing.sampled_current() is None  # no worker timings asked for
    assert span.ref.traceparent().endswith("-00")  # and the client still learns its trace id
    span.end(200)
    tracing.shutdown()
    assert [s["name"] for s in read_lines(tmp_path / "traces.jsonl")] == ["sampled upstream"]


def test_sample_ratio_matches_the_sdk_sampler_decision(tmp_path):
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    sdk = TraceIdRatioBased(0.25)
    tracing.init_tracing(TracingConfig(exporter="file", sample_ratio=0.25), RESOURCE, str(tmp_path))
    decisions = []
    for _ in range(400):
        span = tracing.start_request("r", None, {})
        ours = span.ref.sampled
        span.end(200)
        theirs = sdk.should_sample(None, int(span.ref.trace_id, 16), "r").decision.is_sampled()
        assert ours == theirs
        decisions.append(ours)
    assert 40 < sum(decisions) < 160  # about a quarter


def test_a_slow_collector_costs_dropped_spans_counted_in_metrics_never_a_blocked_request():
    import socket

    # A collector that accepts connections and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}/v1/traces"
    try:
        tracing.init_tracing(TracingConfig(exporter="otlp", endpoint=endpoint, timeout_s=30, max_queue_size=10,
                                           flush_interval_ms=3_600_000), RESOURCE, None)
        before = dropped_spans()
        for _ in range(50):  # the first chunk wakes the thread, which then waits on the collector
            tracing.start_request("r", None, {}).end(200)
        exporter = tracing._state.exporter
        assert len(exporter.queue) <= 10  # what is kept while the collector hangs
        assert dropped_spans() - before >= 30  # the rest was dropped and counted, not waited for
    finally:
        server.close()  # the hung request fails: the thread lets go
        tracing.shutdown()


def test_a_collector_that_is_down_costs_spans_counted_in_metrics():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"
    tracing.init_tracing(TracingConfig(exporter="otlp", endpoint=endpoint), RESOURCE, None)
    before = dropped_spans()
    for _ in range(5):
        tracing.start_request("r", None, {}).end(200)
    tracing.shutdown()  # the last export fails: counted, no exception
    assert dropped_spans() - before == 5


def test_the_file_exporter_writes_when_its_queue_limit_is_reached(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file", max_queue_size=10, flush_interval_ms=60_000), RESOURCE,
                         str(tmp_path))
    for _ in range(50):
        tracing.start_request("r", None, {}).end(200)
    assert len(read_lines(tmp_path / "traces.jsonl")) == 50  # written by the requests themselves, none lost


# ------------------------------------------------------------------------------------------------ fork


def _child_after_fork(path: str, n: int) -> None:
    # State inherited across fork must not be used: the child starts disabled...
    assert not tracing.enabled()
    assert tracing.start_request("must not appear", None, {}) is None
    # ...and builds its own.
    tracing.init_tracing(TracingConfig(exporter="file", path=path, flush_interval_ms=5), {"role": "child"}, None)
    for i in range(n):
        tracing.start_request("child", None, {"i": i, "pad": "x" * 200}).end(200)
    tracing.shutdown()


def test_forked_process_builds_its_own_tracing_and_lines_never_interleave(tmp_path):
    path = tmp_path / "shared.jsonl"
    cfg = TracingConfig(exporter="file", path=str(path), flush_interval_ms=5)
    tracing.init_tracing(cfg, {"role": "parent"}, None)
    n = 2000
    child = FORK.Process(target=_child_after_fork, args=(str(path), n))
    child.start()
    for i in range(n):  # both processes append to one file at the same time
        tracing.start_request("parent", None, {"i": i, "pad": "y" * 200}).end(200)
        if i % 100 == 0:
            time.sleep(0.002)  # let the exporting thread write while the child writes too
    child.join(60)
    assert child.exitcode == 0
    tracing.shutdown()

    spans = read_lines(path)  # every line parses: no torn or interleaved writes
    names = [s["name"] for s in spans]
    assert names.count("parent") == n and names.count("child") == n and "must not appear" not in names
    pids = {s["name"]: s["resource"]["process.pid"] for s in spans}
    assert pids["child"] == child.pid and pids["parent"] == os.getpid()
    assert {s["resource"]["role"] for s in spans if s["name"] == "child"} == {"child"}


# -------------------------------------------------------------------------------------------- settings


def test_tracing_config_problems_name_the_key():
    assert TracingConfig().problems() == []
    bad = dict(TracingConfig(exporter="zipkin", sample_ratio=2.0, flush_interval_ms=0).problems())
    assert set(bad) == {"exporter", "sample_ratio", "flush_interval_ms"}
    grpc = dict(TracingConfig(exporter="otlp", protocol="grpc").problems())  # http endpoint with a path
    assert "4317" in grpc["endpoint"]


@pytest.mark.parametrize("option", ["none", "console", "file", "otlp"])
def test_tracing_options_compose_and_validate(option):
    from framework.config import compose, validate

    resolved = validate(compose(["model=echo", f"tracing={option}"]))
    assert resolved.tracing.exporter == option


# --------------------------------------------------------------------------------------------- metrics


@pytest.fixture()
def metrics_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    path = metrics.init_metrics_dir(str(tmp_path / "prom"))
    yield path
    monkeypatch.delenv(metrics.ENV, raising=False)
    metrics._reset()


def scrape() -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _child_observes() -> None:
    metrics.observe_request("/predict", 200, 0.004)
    metrics.cache_lookup("hit")
    metrics.rejected("queue_full")
    metrics.request_started()  # never finished: the process exits with it in flight
    metrics.observe_batch(8, [0.001] * 8, 0.003)


def test_metrics_render_and_sum_across_processes(metrics_dir):
    assert os.environ[metrics.ENV] == metrics_dir
    before = scrape()
    assert before[("hydraserve_cache_lookups_total", (("result", "hit"),))] == 0

    metrics.observe_request("/predict", 200, 0.002)
    metrics.observe_request("/predict", 503, 0.0001)
    metrics.cache_lookup("hit")
    metrics.cache_lookup("semantic-hit")
    metrics.rejected("deadline")
    metrics.request_started()
    metrics.queue_depth_add(3)
    metrics.observe_batch(4, [0.001, 0.002, 0.003, 0.004], 0.005)

    child = FORK.Process(target=_child_observes)
    child.start()
    child.join(30)
    assert child.exitcode == 0

    s = scrape()
    ok = (("route", "/predict"), ("status", "200"))
    assert s[("hydraserve_request_duration_seconds_count", ok)] == 2  # one here, one in the child
    assert s[("hydraserve_request_duration_seconds_sum", ok)] == pytest.approx(0.006)
    assert s[("hydraserve_request_duration_seconds_count", (("route", "/predict"), ("status", "503")))] == 1
    assert s[("hydraserve_request_duration_seconds_bucket", tuple(sorted((*ok, ("le", "0.002")))))] == 1
    assert s[("hydraserve_cache_lookups_total", (("result", "hit"),))] == 2
    assert s[("hydraserve_cache_lookups_total", (("result", "semantic-hit"),))] == 1
    assert s[("hydraserve_rejected_total", (("reason", "queue_full"),))] == 1
    assert s[("hydraserve_rejected_total", (("reason", "deadline"),))] == 1
    assert s[("hydraserve_batch_size_count", ())] == 2
    assert s[("hydraserve_batch_size_sum", ())] == 12
    assert s[("hydraserve_queue_wait_seconds_count", ())] == 12
    assert s[("hydraserve_forward_seconds_count", ())] == 2
    assert s[("hydraserve_queue_depth", ())] == 3
    # The child died with a request in flight: a dead process no longer counts.
    assert s[("hydraserve_requests_in_flight", ())] == 1
    metrics.request_finished()
    assert scrape()[("hydraserve_requests_in_flight", ())] == 0


def test_metrics_work_in_one_process_without_a_folder(monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    metrics._reset()
    try:
        metrics.cache_lookup("miss")
        metrics.cache_lookup("miss")
        assert scrape()[("hydraserve_cache_lookups_total", (("result", "miss"),))] == 2
    finally:
        metrics._reset()


# ----------------------------------------------------------------------------------------- traces view


def _span(trace, span, parent, name, start_ms, dur_ms, kind="INTERNAL", attrs=None, links=(), status="UNSET"):
    from framework.tracing.otlp import KIND, span_json

    t0 = 1_700_000_000_000_000_000
    out = span_json(trace, span, parent, name, KIND[kind], t0 + int(start_ms * 1e6),
                    t0 + int((start_ms + dur_ms) * 1e6), attrs, "out of memory" if status == "ERROR" else None)
    if links:
        out["links"] = [{"traceId": t, "spanId": s} for t, s in links]
    return out


def _traces_data(spans: list[dict]) -> bytes:
    return orjson.dumps({"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "hydraserve"}}]}, "scopeSpans": [{"spans": spans}]}]})


SLOW, FAST = "a" * 32, "b" * 32


def synthetic_file(path: Path) -> Path:
    spans = [
        _span(SLOW, "1" * 16, "c" * 16, "POST /predict", 0, 12, "SERVER", {"http.response.status_code": 200}),
        _span(SLOW, "2" * 16, "1" * 16, "cache.lookup", 0.1, 0.2, attrs={"cache.result": "miss"}),
        _span(SLOW, "3" * 16, "1" * 16, "queue.wait", 0.5, 6),
        _span(SLOW, "4" * 16, "1" * 16, "batch", 6.5, 5, attrs={"batch.size": 8}),
        _span(SLOW, "5" * 16, "4" * 16, "model.forward", 6.6, 4.8),
        _span(FAST, "6" * 16, None, "POST /predict", 20, 1, "SERVER", {"http.response.status_code": 200}),
        _span(FAST, "7" * 16, "6" * 16, "batch", 20.2, 0.5, status="ERROR"),
        _span("d" * 32, "8" * 16, None, "shared.batch", 6.5, 5, links=[(SLOW, "1" * 16)]),
    ]
    # One process's chunk, and single spans of other writers: every line an OTLP/JSON TracesData.
    data = _traces_data(spans[:5]) + b"\n" + b"".join(_traces_data([s]) + b"\n" for s in spans[5:])
    data += b'{"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": [{"traceId": "torn'  # a writer mid-line
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_traces_view_prints_the_slowest_request_as_a_waterfall(tmp_path, capsys):
    f = synthetic_file(tmp_path / "run" / "traces.jsonl")
    assert traces_view.main([str(f), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 spans, 3 traces, 2 requests" in out
    assert SLOW in out and FAST not in out
    lines = [line for line in out.splitlines() if line.count("|") == 2]  # waterfall rows, not headers
    names = ("POST /predict", "cache.lookup", "queue.wait", "batch", "model.forward", "~ shared.batch")
    rows = {name: next(line for line in lines if line.lstrip().startswith(name)) for name in names}
    # indentation follows the tree; offsets and durations in ms; a bar on a shared axis
    assert rows["model.forward"].index("model.forward") > rows["batch"].index("batch")
    assert re.search(r"queue\.wait\s+0\.500\s+6\.000\s+\|", rows["queue.wait"])
    assert "batch.size=8" in rows["batch"] and "cache.result=miss" in rows["cache.lookup"]
    root_bar = rows["POST /predict"].split("|")[1]
    queue_bar = rows["queue.wait"].split("|")[1]
    assert len(root_bar) == len(queue_bar) == 40
    assert root_bar.count("█") == 40 and 0 < queue_bar.count("█") < 40 and not queue_bar.startswith("█")


def test_traces_view_folder_trace_id_and_png(tmp_path, capsys):
    synthetic_file(tmp_path / "old" / "traces.jsonl")
    newest = synthetic_file(tmp_path / "new" / "traces.jsonl")
    os.utime(tmp_path / "old" / "traces.jsonl", (1, 1))
    png = tmp_path / "w.png"
    assert traces_view.main([str(tmp_path), "--trace-id", FAST[:8], "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert str(newest) in out and FAST in out and SLOW not in out
    assert "ERROR: out of memory" in out  # the failed batch is flagged, with its error
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert traces_view.main([str(tmp_path / "missing.jsonl")]) == 2
    assert traces_view.main([str(newest), "--trace-id", "ffff"]) == 1
    assert "no trace" in capsys.readouterr().err


def test_traces_view_reads_what_the_file_exporter_writes(tmp_path, capsys):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    trace_id = make_request_trace()
    tracing.shutdown()
    assert traces_view.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert trace_id in out and "model.forward" in out and "1 requests" in out


def test_fastapi_builtin_instrumentation_is_off_in_the_server():
    # FastAPI instruments every request itself once an OpenTelemetry provider is configured (and
    # checks for one on every request); hydraserve's own spans replace it.
    import asyncio

    import httpx
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from framework.server import skip_fastapi_telemetry

    def spans_for_one_request(skip: bool) -> int:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        app = FastAPI(telemetry={"tracer_provider": provider})
        app.get("/ping")(lambda: {"ok": True})
        if skip:
            skip_fastapi_telemetry(app)

        async def call() -> int:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return (await client.get("/ping")).status_code

        assert asyncio.run(call()) == 200
        return len(exporter.get_finished_spans())

    assert spans_for_one_request(skip=False) >= 1  # the control: FastAPI would trace on its own
    assert spans_for_one_request(skip=True) == 0

"""Tracing, metrics and the trace viewer, without a server (the end-to-end HTTP tests are elsewhere).

What a user relies on: spans land in the file / collector with their parent links and attributes,
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
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from framework import metrics, traces_view, tracing
from framework.settings import TracingConfig

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
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def make_request_trace(name: str = "POST /predict") -> str:
    """What the server does: a SERVER span, a context carried in a message, worker spans under it."""
    t = tracing.tracer()
    with t.start_as_current_span(name, kind=SpanKind.SERVER, attributes={"http.route": "/predict"}) as span:
        with t.start_as_current_span("cache.lookup", attributes={"cache.result": "miss"}):
            pass
        message = {"input": "hello", "tc": tracing.inject_carrier()}
        # ... the worker side, from the message alone: an SDK span, and spans recorded after the fact.
        parent = tracing.extract_context(message["tc"])
        t0 = time.time_ns()
        tracing.record_span("queue.wait", parent, t0 - 2_000_000, t0)
        batch = t.start_span("batch", context=parent, attributes={"batch.size": 4})
        tracing.record_span("model.forward", batch.get_span_context(), t0 + 1000, t0 + 5000,
                            {"batch.size": 4, "shape": [4, 8]})
        batch.end()
        span.set_attribute("http.response.status_code", 200)
        return f"{span.get_span_context().trace_id:032x}"


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
    assert by_name["batch"]["parent_span_id"] == root["span_id"]
    assert by_name["batch"]["parent_remote"] is True  # it came through the carrier
    assert by_name["model.forward"]["parent_span_id"] == by_name["batch"]["span_id"]
    assert by_name["queue.wait"]["parent_span_id"] == root["span_id"]
    assert by_name["queue.wait"]["end_ns"] - by_name["queue.wait"]["start_ns"] == 2_000_000
    assert by_name["batch"]["attributes"] == {"batch.size": 4}
    assert by_name["model.forward"]["attributes"] == {"batch.size": 4, "shape": [4, 8]}
    assert by_name["model.forward"]["resource"] == root["resource"]
    assert root["attributes"]["http.response.status_code"] == 200
    assert root["end_ns"] >= by_name["batch"]["end_ns"] > by_name["batch"]["start_ns"] > 0
    assert root["status"]["code"] == "UNSET"
    resource = root["resource"]
    assert resource["service.name"] == "hydraserve" and resource["service.version"]
    assert {k: resource[k] for k in RESOURCE} == RESOURCE


def test_init_is_idempotent_and_absolute_paths_are_kept(tmp_path):
    path = tmp_path / "elsewhere" / "t.jsonl"
    cfg = TracingConfig(exporter="file", path=str(path))
    tracing.init_tracing(cfg, RESOURCE, "/nonexistent-output-dir")
    tracing.init_tracing(cfg, RESOURCE, "/nonexistent-output-dir")  # no second provider, no duplicates
    with tracing.tracer().start_as_current_span("once"):
        pass
    tracing.shutdown()
    assert [s["name"] for s in read_lines(path)] == ["once"]


@pytest.mark.parametrize(
    ("receiver", "protocol"), [(OtlpHttpReceiver, "http/protobuf"), (OtlpGrpcReceiver, "grpc")]
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


def test_console_exporter_prints_spans(capsys):
    tracing.init_tracing(TracingConfig(exporter="console"), RESOURCE, None)
    with tracing.tracer().start_as_current_span("printed"):
        pass
    tracing.shutdown()
    assert '"name": "printed"' in capsys.readouterr().out


def test_exporter_none_builds_nothing_and_costs_nothing(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="none"), RESOURCE, str(tmp_path))
    assert not tracing.enabled()
    with tracing.tracer().start_as_current_span("ignored") as span:
        assert not span.is_recording()
        assert tracing.inject_carrier() == {}
        assert tracing.traceparent_of(span) == ""
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- propagation


def test_inject_extract_round_trips_the_trace_id(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    with tracing.tracer().start_as_current_span("api") as span:
        carrier = tracing.inject_carrier()
        header = tracing.traceparent_of(span)
    ctx = span.get_span_context()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-9a-f]", header)
    assert carrier["traceparent"] == header
    assert carrier == orjson.loads(orjson.dumps(carrier))  # survives the queued message as JSON

    with tracing.tracer().start_as_current_span("worker", context=tracing.extract_context(carrier)) as child:
        pass
    assert child.get_span_context().trace_id == ctx.trace_id
    assert child.parent.span_id == ctx.span_id

    # Incoming HTTP headers (a client's traceparent and tracestate) are honoured the same way.
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "v=1"}
    with tracing.tracer().start_as_current_span("server", context=tracing.extract_context(incoming)) as s:
        assert tracing.traceparent_of(s).startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert tracing.inject_carrier()["tracestate"] == "v=1"  # vendor state travels on
    assert s.parent.span_id == 0x00F067AA0BA902B7 and s.parent.is_remote

    # No header, or a malformed one: a new root, never an error.
    for carrier in (None, {}, {"traceparent": "garbage"}):
        with tracing.tracer().start_as_current_span("root", context=tracing.extract_context(carrier)) as r:
            assert r.parent is None


def test_record_span_follows_the_parent_sampling_and_marks_errors(tmp_path):
    assert tracing.record_span("off", None, 1, 2) is None  # tracing off: nothing, no error
    tracing.init_tracing(TracingConfig(exporter="file"), RESOURCE, str(tmp_path))
    sampled = tracing.extract_context({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    unsampled = tracing.extract_context({"traceparent": "00-" + "3" * 32 + "-" + "4" * 16 + "-00"})
    t0 = time.time_ns()
    batch = tracing.record_span("batch", sampled, t0, t0 + 10, {"batch.size": 2},
                                error=RuntimeError("model failure"))
    assert batch is not None and batch.trace_id == int("1" * 32, 16)
    assert tracing.record_span("phase", batch, t0, t0 + 5) is not None
    assert tracing.record_span("dropped", unsampled, t0, t0 + 5) is None
    root = tracing.record_span("root", None, t0, t0 + 5, kind=SpanKind.CONSUMER)  # no parent: a new trace
    assert root is not None and root.trace_id != batch.trace_id
    tracing.shutdown()
    spans = {s["name"]: s for s in read_lines(tmp_path / "traces.jsonl")}
    assert set(spans) == {"batch", "phase", "root"}
    assert spans["batch"]["parent_span_id"] == "2" * 16
    assert spans["batch"]["status"] == {"code": "ERROR", "description": "model failure"}
    assert spans["batch"]["events"][0]["attributes"]["exception.type"] == "RuntimeError"
    assert spans["phase"]["parent_span_id"] == spans["batch"]["span_id"]
    assert spans["root"]["kind"] == "CONSUMER" and spans["root"]["parent_span_id"] is None


def test_sample_ratio_zero_records_nothing_but_honours_a_sampled_parent(tmp_path):
    tracing.init_tracing(TracingConfig(exporter="file", sample_ratio=0.0), RESOURCE, str(tmp_path))
    for _ in range(20):
        make_request_trace()
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    upstream = tracing.extract_context(incoming)
    with tracing.tracer().start_as_current_span("sampled upstream", context=upstream):
        pass
    tracing.shutdown()
    assert [s["name"] for s in read_lines(tmp_path / "traces.jsonl")] == ["sampled upstream"]


# ------------------------------------------------------------------------------------------------ fork


def _child_after_fork(path: str, n: int) -> None:
    # A provider inherited across fork must not be used: the child starts disabled...
    assert not tracing.enabled()
    with tracing.tracer().start_as_current_span("must not appear"):
        pass
    # ...and builds its own.
    tracing.init_tracing(TracingConfig(exporter="file", path=path), {"role": "child"}, None)
    for i in range(n):
        with tracing.tracer().start_as_current_span("child", attributes={"i": i, "pad": "x" * 200}):
            pass
    tracing.shutdown()


def test_forked_process_builds_its_own_provider_and_lines_never_interleave(tmp_path):
    path = tmp_path / "shared.jsonl"
    cfg = TracingConfig(exporter="file", path=str(path), flush_interval_ms=5)
    tracing.init_tracing(cfg, {"role": "parent"}, None)
    n = 400
    child = FORK.Process(target=_child_after_fork, args=(str(path), n))
    child.start()
    for i in range(n):  # both processes append to one file at the same time
        with tracing.tracer().start_as_current_span("parent", attributes={"i": i, "pad": "y" * 200}):
            pass
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
    t0 = 1_700_000_000_000_000_000
    return {"trace_id": trace, "span_id": span, "parent_span_id": parent, "name": name, "kind": kind,
            "start_ns": t0 + int(start_ms * 1e6), "end_ns": t0 + int((start_ms + dur_ms) * 1e6),
            "attributes": attrs or {}, "status": {"code": status, "description": None}, "events": [],
            "links": [{"trace_id": t, "span_id": s, "attributes": {}} for t, s in links], "resource": {}}


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
    data = b"".join(orjson.dumps(s) + b"\n" for s in spans) + b'{"trace_id": "torn'  # a writer mid-line
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
    assert "ERROR" in out  # the failed batch is flagged
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

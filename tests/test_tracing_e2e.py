"""One trace per request across the API process and the worker; OTLP export; /metrics; errors."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework import traces_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from otlp_receiver import OtlpHttpReceiver  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
WORKER_SPANS = {"queue.wait", "batch", "preprocess", "model.forward", "postprocess"}


def _read_spans(folder: str, trace_id: str, want: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    spans: list[dict] = []
    while time.monotonic() < deadline:
        spans = []
        for path in Path(folder).rglob("traces.jsonl"):
            spans += traces_view.load_spans(path)
        spans = [s for s in spans if s["trace_id"] == trace_id]
        if len(spans) >= want:
            return spans
        time.sleep(0.2)
    return spans


@pytest.fixture(scope="module")
def traced(serve_module, tiny_dir):
    return serve_module(["model=tiny", f"model.path={tiny_dir}", "model.fail_marker=-1.0", "tracing=file",
                         "cache=memory", "batching=none"])


def test_client_trace_continues_across_processes(traced):
    r = httpx.post(traced.url + "/predict", json={"input": [0.5] * 8}, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
    assert r.headers["traceparent"].split("-")[1] == CLIENT_TRACE  # the client learns its trace id
    spans = _read_spans(traced.output_dir, CLIENT_TRACE, want=7)
    by_name = {s["name"]: s for s in spans}
    server = by_name["POST /predict"]
    assert server["kind"] == "SERVER" and server["parent_span_id"] == "00f067aa0ba902b7"
    attrs = server["attributes"]
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/predict"
    assert attrs["http.response.status_code"] == 200 and attrs["url.path"] == "/predict"
    assert by_name["cache.lookup"]["parent_span_id"] == server["span_id"]
    assert WORKER_SPANS <= set(by_name), set(by_name)
    assert by_name["batch"]["parent_span_id"] == server["span_id"]  # crossed the process boundary
    assert by_name["model.forward"]["parent_span_id"] == by_name["batch"]["span_id"]
    # The worker's spans nest inside the request on the waterfall: the batch ends when its answers
    # are sent, before the API process answers the client.
    assert server["start_ns"] <= by_name["queue.wait"]["start_ns"] <= by_name["batch"]["start_ns"]
    assert by_name["model.forward"]["end_ns"] <= by_name["batch"]["end_ns"] <= server["end_ns"]
    fwd = by_name["model.forward"]["attributes"]
    assert fwd["batch.size"] == 1 and fwd["model"] == "tiny" and fwd["quantization"] == "none"
    assert server["resource"]["hydraserve.model"] == "tiny"


def test_every_line_of_a_real_servers_file_is_otlp_json_any_opentelemetry_tool_reads(traced):
    from google.protobuf import json_format
    from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

    trace_id = "44444444444444444444444444444444"
    r = httpx.post(traced.url + "/predict", json={"input": [0.125] * 8},  # a cache miss: the worker's spans too
                   headers={"traceparent": f"00-{trace_id}-4444444444444444-01", "tracestate": "vendor=%41"})
    assert r.status_code == 200
    assert len(_read_spans(traced.output_dir, trace_id, want=7)) >= 7
    lines = [line for path in Path(traced.output_dir).rglob("traces.jsonl") for line in path.read_bytes().splitlines()]
    spans = 0
    for line in lines:  # what the Collector's otlpjsonfile receiver does with each line
        data = json_format.Parse(line, TracesData(), ignore_unknown_fields=False)
        spans += sum(len(ss.spans) for rs in data.resource_spans for ss in rs.scope_spans)
    assert spans >= 7
    worker = {s["name"]: s for s in _read_spans(traced.output_dir, trace_id, want=7)}
    assert worker["model.forward"]["trace_state"] == "vendor=%41"  # the client's tracestate, on every span


def test_failing_model_call_marks_spans_as_errors(traced):
    trace_id = "11111111111111111111111111111111"
    r = httpx.post(traced.url + "/predict", json={"input": [-1.0] * 8},
                   headers={"traceparent": f"00-{trace_id}-1111111111111111-01", "Cache-Control": "no-cache"})
    assert r.status_code == 500 and r.json()["error"] == "model failure"
    spans = {s["name"]: s for s in _read_spans(traced.output_dir, trace_id, want=3)}
    assert spans["POST /predict"]["status"]["code"] == "ERROR"
    assert spans["POST /predict"]["attributes"]["error.type"] == "500"
    assert spans["batch"]["status"]["code"] == "ERROR"


def test_client_errors_leave_status_unset(traced):
    trace_id = "22222222222222222222222222222222"
    r = httpx.post(traced.url + "/predict", json={"input": "nope"},
                   headers={"traceparent": f"00-{trace_id}-2222222222222222-01"})
    assert r.status_code == 422
    spans = {s["name"]: s for s in _read_spans(traced.output_dir, trace_id, want=1)}
    assert spans["POST /predict"]["status"]["code"] == "UNSET"


def test_metrics_move_with_traffic(traced):
    def samples() -> dict:
        text = httpx.get(traced.url + "/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0) + s.value
        return out

    before = samples()
    for _ in range(3):
        assert httpx.post(traced.url + "/predict", json={"input": [0.25] * 8}).status_code == 200
    after = samples()

    def total(snapshot: dict, name: str, **labels) -> float:
        return sum(v for (n, lbl), v in snapshot.items() if n == name and all(dict(lbl).get(k) == w
                                                                               for k, w in labels.items()))

    assert total(after, "hydraserve_request_duration_seconds_count", route="/predict", status="200") - \
        total(before, "hydraserve_request_duration_seconds_count", route="/predict", status="200") == 3
    assert total(after, "hydraserve_cache_lookups_total", result="hit") - \
        total(before, "hydraserve_cache_lookups_total", result="hit") >= 2
    assert total(after, "hydraserve_batch_size_count") > total(before, "hydraserve_batch_size_count")


def test_otlp_receiver_sees_the_same_trace(serve, tiny_dir):
    with OtlpHttpReceiver() as receiver:
        server = serve(["model=tiny", f"model.path={tiny_dir}", "tracing=otlp", f"tracing.endpoint={receiver.endpoint}",
                        "cache=none", "tracing.flush_interval_ms=100"])
        r = httpx.post(server.url + "/predict", json={"input": [0.5] * 8}, headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
        deadline = time.monotonic() + 15
        names: set = set()
        while time.monotonic() < deadline and not ({"POST /predict"} | WORKER_SPANS) <= names:
            names = {s["name"] for s in receiver.wait_for(6, timeout=1) if s["trace_id"] == CLIENT_TRACE}
        assert ({"POST /predict"} | WORKER_SPANS) <= names


def test_a_request_past_its_deadline_still_shows_where_its_time_went(serve, tiny_dir):
    # The client gets its 504 at 50 ms; the worker was already computing (200 ms) and its late
    # answer still brings the spans that explain the wait.
    server = serve(["model=tiny", f"model.path={tiny_dir}", "model.delay_ms=200", "batching=none", "cache=none",
                    "tracing=file", "tracing.flush_interval_ms=100"])
    trace_id = "33333333333333333333333333333333"
    r = httpx.post(server.url + "/predict", json={"input": [0.5] * 8},
                   headers={"traceparent": f"00-{trace_id}-3333333333333333-01", "X-Request-Timeout-Ms": "50"})
    assert r.status_code == 504
    spans = {s["name"]: s for s in _read_spans(server.output_dir, trace_id, want=6)}
    assert spans["POST /predict"]["attributes"]["http.response.status_code"] == 504
    assert WORKER_SPANS <= set(spans), set(spans)
    assert spans["model.forward"]["end_ns"] - spans["model.forward"]["start_ns"] >= 150_000_000
    assert spans["batch"]["parent_span_id"] == spans["POST /predict"]["span_id"]

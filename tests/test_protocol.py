"""The wire protocol between API processes and workers: each frame type round-trips, every malformed
frame is refused with a ProtocolError (which receivers log and drop), never another exception."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from framework.tracing import SpanRef
from framework.transport import protocol as p


def test_request_round_trip_sampled_and_not():
    for state in (None, "v=1"):
        sampled = SpanRef("ab" * 16, "cd" * 8, True, state)
        frame = p.decode_request(p.encode_request("r1", 3, ["a", {"b": 1}], 10.5, 40.5, sampled))
        assert (frame.id, frame.reply_to, frame.items, frame.arrival, frame.deadline) == \
            ("r1", 3, ["a", {"b": 1}], 10.5, 40.5)
        assert (frame.parent.trace_id, frame.parent.span_id, frame.parent.trace_state) == ("ab" * 16, "cd" * 8, state)
        assert frame.parent.sampled and frame.parent.remote and frame.n == 2
    plain = p.decode_request(p.encode_request("r2", "/tmp/sock", [1], 1, 2))
    assert plain.reply_to == "/tmp/sock" and plain.parent is None


def test_answer_round_trip_with_numpy_outputs():
    reply = p.decode_reply(p.encode_answer("r1", [np.array([0.5, 1.0], dtype=np.float32), "x"]))
    assert (reply.kind, reply.id, reply.body["out"], reply.final) == ("out", "r1", [[0.5, 1.0], "x"], True)


def test_error_round_trip():
    reply = p.decode_reply(p.encode_error("r1", 422, "bad input", {"field": "input"}))
    assert reply.kind == "err" and reply.final
    assert reply.body["err"] == {"status": 422, "error": "bad input", "detail": {"field": "input"}}


def test_stream_chunk_and_end_round_trip():
    chunk = p.decode_reply(p.encode_chunk("r1", {"text": "hel"}))
    assert (chunk.kind, chunk.body["chunk"], chunk.final) == ("chunk", {"text": "hel"}, False)
    end = p.decode_reply(p.encode_end("r1"))
    assert (end.kind, end.final) == ("end", True)


def test_worker_dead_round_trip():
    reply = p.decode_reply(p.encode_worker_dead(2))
    assert reply.kind == "dead" and reply.body["dead"] == 2 and reply.id is None


@pytest.mark.parametrize("s", [1, ["ab" * 16, "cd" * 8], {"traceparent": "00-ab-cd-01"},
                               {"traceparent": f"00-{'X' * 32}-{'c' * 16}-01"},
                               {"traceparent": f'00-ab"}},{{"x":"{"0" * 21}-{"cd" * 8}-01'},
                               {"traceparent": f"00-{'0' * 32}-{'c' * 16}-01"},
                               {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01", "tracestate": 5}])
def test_a_request_whose_span_is_malformed_is_served_untraced(s):
    """The worker writes the ids into its spans as they are: anything but hex ids is not a parent,
    and the request is still served (only its worker spans are lost)."""
    frame = p.decode_request(orjson.dumps({"id": "r", "to": 1, "items": [1], "t": 1, "dl": 2, "s": s}))
    assert frame.id == "r" and frame.parent is None


def test_cancel_round_trip_and_requests_are_not_control_frames():
    assert p.decode_control(p.encode_cancel("r9")) == "r9"
    assert p.decode_control(p.encode_request("r1", 0, [1], 1.0, 2.0)) is None


@pytest.mark.parametrize("raw, why", [
    (b"", "not JSON"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"to": 1, "items": [1], "t": 1, "dl": 2}', "'id'"),
    (b'{"id": 5, "to": 1, "items": [1], "t": 1, "dl": 2}', "'id'"),
    (b'{"id": "r", "items": [1], "t": 1, "dl": 2}', "'to'"),
    (b'{"id": "r", "to": [1], "items": [1], "t": 1, "dl": 2}', "'to'"),
    (b'{"id": "r", "to": 1, "items": [], "t": 1, "dl": 2}', "'items'"),
    (b'{"id": "r", "to": 1, "items": "abc", "t": 1, "dl": 2}', "'items'"),
    (b'{"id": "r", "to": 1, "items": [1], "t": "soon", "dl": 2}', "numbers"),
    (b'{"id": "r", "to": 1, "items": [1], "t": 1}', "numbers"),
    (b'{"id": "r", "to": 1, "items": [1], "t": true, "dl": 2}', "numbers"),
])
def test_malformed_request_frames_are_refused(raw, why):
    with pytest.raises(p.ProtocolError, match=why):
        p.decode_request(raw)


@pytest.mark.parametrize("raw, why", [
    (b"", "not JSON"),
    (b"\x00\x01", "not JSON"),
    (b'"just a string"', "must be an object"),
    (b'{"out": [1]}', "'id'"),
    (b'{"id": "r"}', "none of"),
    (b'{"id": "r", "out": 5}', "must be a list"),
    (b'{"id": "r", "err": "boom"}', "integer 'status'"),
    (b'{"id": "r", "err": {"status": "500", "error": "x"}}', "integer 'status'"),
    (b'{"id": "r", "err": {"status": 500}}', "string 'error'"),
    (b'{"dead": "w1"}', "integer worker"),
])
def test_malformed_reply_frames_are_refused(raw, why):
    with pytest.raises(p.ProtocolError, match=why):
        p.decode_reply(raw)


@pytest.mark.parametrize("raw", [b'{"cancel": 5}', b'{"cancel": "r", ', b'{"cancel":null}'])
def test_malformed_cancel_frames_are_refused(raw):
    with pytest.raises(p.ProtocolError):
        p.decode_control(raw)

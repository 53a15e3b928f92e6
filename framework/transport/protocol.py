"""The wire protocol between API processes and inference workers: the one place frames are built and read.

Every message that crosses the process boundary is encoded and decoded here; the HTTP side
(``framework/http.py``, the dispatcher), the worker loop and the transports never build or parse a
frame themselves. Frames are orjson bytes (never pickle). A transport moves them as opaque bytes.

API process -> worker:

* **request** ``{"id", "to", "items", "t", "dl"[, "s"]}``: ``to`` is the reply address, ``t`` the
  monotonic time the API process queued it, ``dl`` the monotonic deadline after which the client has
  already been answered 504, ``s`` present when the request's trace is sampled: the request's span as
  W3C trace context (``{"traceparent"[, "tracestate"]}``), under which the worker records its own spans.
* **cancel** ``{"cancel": id}``: the client went away; drop the request wherever it is.

Worker -> API process (each a *reply*):

* **answer** ``{"id", "out": [one output per item]}``
* **error** ``{"id", "err": {"status", "error", "detail"}}``
* **chunk** ``{"id", "chunk": ...}`` one piece of a streamed answer; **end** ``{"id", "end": true}``
* a generated request streams chunks ``{"t": new text, "n": output tokens so far}``; its last chunk
  adds ``"f"`` (finish reason) and ``"p"`` (prompt tokens), then its end frame follows.

Transport -> API process: **worker dead** ``{"dead": worker}`` when a worker's connection closes.

Monotonic clocks are shared by every process on a machine, so ``t`` and ``dl`` travel as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from framework.tracing.context import SpanRef, parse_traceparent

__all__ = [
    "ProtocolError",
    "Reply",
    "RequestFrame",
    "decode_control",
    "decode_reply",
    "decode_request",
    "encode_answer",
    "encode_cancel",
    "encode_chunk",
    "encode_end",
    "encode_error",
    "encode_request",
    "encode_worker_dead",
]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


class ProtocolError(ValueError):
    """A frame that does not follow this protocol; receivers drop it (and log), never crash."""


# ------------------------------------------------------------------------ API process -> worker
@dataclass(slots=True)
class RequestFrame:
    """A queued request as the worker sees it."""

    id: str
    reply_to: str | int
    items: list
    arrival: float  # time.monotonic() when the API process queued it
    deadline: float  # time.monotonic() after which the client has already been answered 504
    parent: SpanRef | None  # a sampled request's span: the worker records its own spans under it

    @property
    def n(self) -> int:
        return len(self.items)


def encode_request(rid: str, reply_to: str | int, items: list, arrival: float, deadline: float,
                   parent: SpanRef | None = None) -> bytes:
    """``parent``: the request's span when its trace is sampled (``None``: the worker records nothing)."""
    message: dict[str, Any] = {"id": rid, "to": reply_to, "items": items, "t": arrival, "dl": deadline}
    if parent is not None:
        message["s"] = parent.carrier()
    return orjson.dumps(message)


def _parent(value: Any) -> SpanRef | None:
    """A request frame's ``s``, parsed as a client's headers are (``parse_traceparent``): the worker
    writes its ids into its spans as they are. One that is not valid trace context leaves the request
    untraced: the request itself is still served."""
    if type(value) is not dict or not all(type(v) is str for v in value.values()):
        return None
    return parse_traceparent(value)


def _object(raw: bytes, what: str) -> dict:
    """The JSON object a ``what`` frame holds; ``ProtocolError`` when it is not JSON or not an object."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"{what} frame is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{what} frame must be an object, got {type(msg).__name__}")
    return msg


def decode_request(raw: bytes) -> RequestFrame:
    """The request in ``raw``; ``ProtocolError`` naming what is wrong when it is not one."""
    msg = _object(raw, "request")
    rid, reply_to, items = msg.get("id"), msg.get("to"), msg.get("items")
    if not isinstance(rid, str):
        raise ProtocolError("request frame has no string 'id'")
    if type(reply_to) not in (str, int):
        raise ProtocolError("request frame has no reply address 'to'")
    if not isinstance(items, list) or not items:
        raise ProtocolError("request frame has no non-empty 'items' list")
    arrival, deadline = msg.get("t"), msg.get("dl")
    # A queued time that is not a number would break the batcher's arithmetic later: refuse it here.
    if type(arrival) not in (int, float) or type(deadline) not in (int, float):
        raise ProtocolError("request frame's 't' and 'dl' must be numbers (monotonic seconds)")
    return RequestFrame(rid, reply_to, items, float(arrival), float(deadline), _parent(msg.get("s")))


def encode_cancel(rid: str) -> bytes:
    return orjson.dumps({"cancel": rid})


def decode_control(raw: bytes) -> str | None:
    """The request id of a cancel frame, or ``None`` when ``raw`` is not a control frame (a request)."""
    if not raw.startswith(b'{"cancel":'):
        return None
    try:
        rid = orjson.loads(raw)["cancel"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ProtocolError("malformed cancel frame") from None
    if not isinstance(rid, str):
        raise ProtocolError("cancel frame's id must be a string")
    return rid


# ------------------------------------------------------------------------ worker -> API process
def encode_answer(rid: str, outputs: list) -> bytes:
    return orjson.dumps({"id": rid, "out": outputs}, option=_NUMPY)


def encode_error(rid: str, status: int, error: str, detail: Any = None) -> bytes:
    return orjson.dumps({"id": rid, "err": {"status": status, "error": error, "detail": detail}}, option=_NUMPY)


def encode_chunk(rid: str, chunk: Any) -> bytes:
    return orjson.dumps({"id": rid, "chunk": chunk}, option=_NUMPY)


def encode_end(rid: str) -> bytes:
    return orjson.dumps({"id": rid, "end": True})


def encode_worker_dead(worker: int) -> bytes:
    return orjson.dumps({"dead": worker})


@dataclass(slots=True)
class Reply:
    """A decoded reply: ``kind`` is "out", "err", "chunk", "end" or "dead"; ``body`` the message."""

    kind: str
    body: dict

    @property
    def id(self) -> str | None:
        return self.body.get("id")

    @property
    def final(self) -> bool:
        """True when nothing more will come for this request (an answer, an error or a stream's end)."""
        return self.kind in ("out", "err", "end")


_KINDS = ("out", "err", "chunk", "end")


def decode_reply(raw: bytes) -> Reply:
    """The reply in ``raw``; ``ProtocolError`` if malformed."""
    msg = _object(raw, "reply")
    if "dead" in msg:
        if type(msg["dead"]) is not int:
            raise ProtocolError("worker-dead frame must name an integer worker")
        return Reply("dead", msg)
    if not isinstance(msg.get("id"), str):
        raise ProtocolError("reply frame has no string 'id'")
    kind = next((k for k in _KINDS if k in msg), None)
    if kind is None:
        raise ProtocolError(f"reply frame has none of {', '.join(_KINDS)}")
    if kind == "out" and not isinstance(msg["out"], list):
        raise ProtocolError("answer frame's 'out' must be a list")
    if kind == "err":
        err = msg["err"]
        if not isinstance(err, dict) or type(err.get("status")) is not int or not isinstance(err.get("error"), str):
            raise ProtocolError("error frame's 'err' must hold an integer 'status' and a string 'error'")
    return Reply(kind, msg)

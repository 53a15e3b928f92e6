"""The inference worker's loop: event-driven batching over a ``WorkerChannel``.

It blocks on the channel until a request arrives (no polling), keeps the pending requests in
arrival order, and asks the batching plugin what to do each time the pending set changes:
run a batch of up to N items now, or wait at most T for company (an arrival ends the wait early).
Expired requests are dropped before they are computed. A batch that fails is re-run request by
request, so one bad request never fails its neighbours.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from framework import metrics, tracing
from framework.engine import pad_items
from framework.errors import RequestError
from framework.plugin import BatchingPlugin, HardwarePlugin, ModelPlugin
from framework.tracing.otlp import Slot, SpanTree, child_span, exception_attributes
from framework.transport.base import WorkerChannel
from framework.transport.protocol import (
    ProtocolError,
    RequestFrame,
    decode_control,
    decode_request,
    encode_answer,
    encode_chunk,
    encode_end,
    encode_error,
)

log = logging.getLogger("hydraserve.worker")

_IDLE_WAIT_S = 1.0  # how long one blocking receive lasts when nothing is pending (only bounds shutdown)


# A queued request as the worker sees it (the protocol's request frame).
Pending = RequestFrame


def _parse(raw: bytes) -> Pending | None:
    try:
        return decode_request(raw)
    except ProtocolError as exc:  # a malformed message is dropped, never a crash
        log.warning("dropping a malformed request message (%d bytes): %s", len(raw), exc)
        return None


def _drop_cancelled(pending: deque[Pending], raw: bytes) -> int:
    """Remove the request a cancel frame names from ``pending``; returns the items removed."""
    try:
        rid = decode_control(raw)
    except ProtocolError as exc:
        log.warning("dropping a malformed cancel frame: %s", exc)
        return 0
    for req in pending:
        if req.id == rid:
            pending.remove(req)
            return req.n
    return 0  # already computed (or being computed): nothing left to stop


def record_spans(batch_spans: bytes, req: Pending, start_mono: float, start_ns: int) -> None:
    """Record a sampled request's worker spans under its span: the batch's plus its own ``queue.wait``,
    from when the API process queued it to ``start_ns`` (``start_mono`` on the monotonic clock, which
    every process shares, so the queued time travels as it is)."""
    # round, not int: a float difference of seconds times 1e9 lands just below a whole number as
    # often as above it (0.002 s -> 1999999.99... ns), and int() would shave a nanosecond off.
    queued_ns = start_ns - round((start_mono - req.arrival) * 1e9)
    tracing.record_tree(req.parent, child_span(batch_spans, b"queue.wait", queued_ns, start_ns))


class BatchRunner:
    """Runs one batch through the model hooks and answers each request."""

    def __init__(self, model: ModelPlugin, hardware: HardwarePlugin, channel: WorkerChannel, labels: dict):
        self.model = model
        self.hardware = hardware
        self.channel = channel
        self.labels = labels  # model/quantization/device attributes for spans
        self.batch_counter = 0
        self.batch_id_prefix = f"{os.getpid():x}-"  # batch.id = worker pid (hex) - batch number
        # A batch's spans, encoded with one % formatting from the times and counts of each batch.
        self._tree = SpanTree([
            ("batch", -1, {"batch.size": Slot(), "batch.id": Slot(self.batch_id_prefix), "batch.requests": Slot()}),
            ("preprocess", 0, None),
            ("model.forward", 0, {**labels, "batch.size": Slot()}),
            ("postprocess", 0, None)])

    def _compute(self, items: list) -> tuple[list, dict]:
        n = len(items)
        target = max(self.hardware.pad_batch_size(n), n)
        # Pad with copies of the last item so a compiled model sees a bucketed shape; dropped below.
        padded = pad_items(items, target)
        t0 = time.time_ns()
        x = self.model.preprocess(padded)
        t1 = time.time_ns()
        y = self.model.forward(x)
        t2 = time.time_ns()
        outputs = self.model.postprocess(y)[:n]
        t3 = time.time_ns()
        return outputs, {"pre": (t0, t1), "fwd": (t1, t2), "post": (t2, t3), "padded": target}

    def run(self, batch: list[Pending]) -> float:
        """Run ``batch``; return its compute seconds (for the batching cost model)."""
        self.batch_counter += 1
        items = [item for req in batch for item in req.items]
        start_mono = time.monotonic()
        start_ns = time.time_ns()
        try:
            outputs, phases = self._compute(items)
        except Exception as exc:
            if len(batch) > 1:  # isolate the culprit: re-run each request on its own
                for req in batch:
                    self.run([req])
                return time.monotonic() - start_mono
            self._fail(batch[0], exc, start_mono, start_ns)
            return time.monotonic() - start_mono
        seconds = time.monotonic() - start_mono
        # The batch's spans, encoded once for all its sampled requests, recorded once their answers are out.
        sampled = [req for req in batch if req.parent is not None]
        spans = self._spans(len(items), len(batch), phases, start_ns) if sampled else None
        offset = 0
        for req in batch:
            out = outputs[offset:offset + req.n]
            offset += req.n
            self.channel.send(req.reply_to, encode_answer(req.id, out))
        for req in sampled:
            record_spans(spans, req, start_mono, start_ns)
        waits = [start_mono - r.arrival for r in batch]
        metrics.observe_batch(len(items), waits, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch %d: %d items in %d requests (padded to %d), queue wait max %.2f ms, compute %.2f ms",
                      self.batch_counter, len(items), len(batch), phases["padded"], max(waits) * 1000,
                      seconds * 1000)
        return seconds

    def run_streams(self, batch: list[Pending]) -> float:
        """Streaming models: each request's chunks go out as they are produced, one request at a time."""
        start_mono = time.monotonic()
        for req in batch:
            req_mono, start_ns = time.monotonic(), time.time_ns()
            try:
                for item in req.items:
                    for chunk in self.model.stream(item):
                        self.channel.send(req.reply_to, encode_chunk(req.id, chunk))
                self.channel.send(req.reply_to, encode_end(req.id))
            except Exception as exc:
                self._fail(req, exc, req_mono, start_ns)
        return time.monotonic() - start_mono

    def _fail(self, req: Pending, exc: Exception, start_mono: float, start_ns: int) -> None:
        if isinstance(exc, RequestError):
            status, error, detail = exc.status, exc.message, {"field": exc.field} if exc.field else None
            failure = None  # the client's error, not the batch's (HTTP conventions: 4xx leaves it unset)
        else:
            log.exception("model failure on request %s", req.id)
            status, error, detail = 500, "model failure", f"{type(exc).__name__}: {exc}"
            failure = exception_attributes(exc)
        spans = self._spans(req.n, 1, None, start_ns, failure) if req.parent is not None else None
        self.channel.send(req.reply_to, encode_error(req.id, status, error, detail))
        if spans is not None:
            record_spans(spans, req, start_mono, start_ns)

    def _spans(self, size: int, requests: int, phases: dict | None, start_ns: int,
               failure: dict | None = None) -> bytes:
        """The batch's spans, OTLP/JSON (``tracing.encode_spans``' format), under the request span.

        The worker records them itself (``record_spans``), in its own export queue, under the span
        id each sampled request frame carries: one ``SpanTree.encode`` per batch (one % formatting)
        and one ``fill`` per sampled request. (They used to ride back after each answer for the API
        process to fill in and write: the same throughput and CPU per request on ``echo``, measured
        side by side, with a trailer in the protocol and a table of 504'd requests awaiting theirs.)
        Per-request child spans (not span links): each request's trace shows the batch it rode in,
        and ``batch.id`` ties together the requests that shared it.
        """
        # The batch ends as its answers start to go out: what follows is the trip back to the API process.
        end_ns = time.time_ns()
        if phases is None:  # a failed request, on its own: the batch span with the error
            attrs = {"batch.size": size, "batch.id": self.batch_id_prefix + str(self.batch_counter),
                     "batch.requests": requests}
            return tracing.encode_spans([("batch", start_ns, end_ns, attrs, -1, failure)])
        (p0, p1), (f0, f1), (q0, q1) = phases["pre"], phases["fwd"], phases["post"]
        return self._tree.encode((start_ns, end_ns, size, self.batch_counter, requests, p0, p1, f0, f1, size, q0, q1))


def serve_forever(model: ModelPlugin, batching: BatchingPlugin, hardware: HardwarePlugin,
                  channel: WorkerChannel, labels: dict) -> None:
    runner = BatchRunner(model, hardware, channel, labels)
    streaming = model.streaming()
    pending: deque[Pending] = deque()
    pending_items = 0
    # The depth last written to the gauge: a write is a locked store into prometheus' mmap file (ten
    # calls), so it happens only when the depth changes, not twice a batch (0 -> 0 at concurrency 1).
    shown_depth = None

    def admit(raw_messages: list[bytes]) -> None:
        nonlocal pending_items
        for raw in raw_messages:
            if raw.startswith(b'{"cancel":'):  # a stream's client went away before its turn
                pending_items -= _drop_cancelled(pending, raw)
                continue
            req = _parse(raw)
            if req is not None:
                pending.append(req)
                pending_items += req.n

    while True:
        if not pending:
            admit(channel.recv(_IDLE_WAIT_S))
            continue
        now = time.monotonic()
        # Expired work is never computed: its client already got a 504.
        if any(r.deadline <= now for r in pending):
            for req in [r for r in pending if r.deadline <= now]:
                pending.remove(req)
                pending_items -= req.n
                channel.send(req.reply_to, encode_error(req.id, 504, "deadline exceeded before compute"))
            if not pending:
                if shown_depth != 0:
                    metrics.set_queue_depth(shown_depth := 0)
                continue
        if log.isEnabledFor(logging.DEBUG):
            log.debug("queue depth %d items in %d requests", pending_items, len(pending))
        decision = batching.plan(pending_items, pending[0].arrival, min(r.deadline for r in pending), now)
        if not decision.run:
            if shown_depth != pending_items:  # all of it waits (for company, or for its deadline)
                metrics.set_queue_depth(shown_depth := pending_items)
            admit(channel.recv(max(decision.wait_s, 0.0)))
            continue
        batch = [pending.popleft()]
        taken = batch[0].n
        while pending and taken + pending[0].n <= max(decision.size, 1):
            req = pending.popleft()
            batch.append(req)
            taken += req.n
        pending_items -= taken
        # What is still waiting while this batch runs (0 once the queue drains): without this the
        # gauge kept the depth seen before the last batch, 1 on an idle server.
        if shown_depth != pending_items:
            metrics.set_queue_depth(shown_depth := pending_items)
        seconds = runner.run_streams(batch) if streaming else runner.run(batch)
        batching.record(taken, seconds)
        # Whatever arrived while the batch ran joins the queue before the next decision.
        admit(channel.recv(0))

"""The dispatcher: everything between an endpoint's decoded items and the worker's answer.

One ``Dispatcher`` per API process. It owns admission control (a bounded number of admitted but
unanswered requests across API processes: beyond it 503), the in-flight table (request id -> the
reply being waited for), deadlines (504; the late answer of a request already answered 504 is
dropped, and its worker still records its spans in its trace), split/join (a request larger than the batcher's limit
runs as several queued requests, joined back in order) and streams (a request's replies as they
come). It speaks to workers only through ``framework/transport/protocol.py``'s frames and knows
nothing of HTTP: the HTTP side (``framework/http.py``) turns its results into responses, and a new
endpoint family reuses it as it is.

Results are plain dicts, ``{"out": [one output per item]}`` or ``{"err": {"status", "error",
"detail"}}``, so an endpoint maps them onto its own error shape.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from framework import metrics, tracing
from framework.settings import ServerConfig
from framework.transport.base import ApiChannel, ChannelFactory, NoWorkerAvailable
from framework.transport.protocol import ProtocolError, decode_reply, encode_cancel, encode_request

log = logging.getLogger("hydraserve.dispatch")

_NO_DEADLINE_S = 7 * 24 * 3600.0  # what a stream without a client deadline tells the worker


class _Reply:
    """Waits for one answer (``future``) or, for a streamed answer, collects its messages (``queue``)."""

    __slots__ = ("future", "queue", "worker")

    def __init__(self, future: asyncio.Future | None, worker: int | None, queue: asyncio.Queue | None = None):
        self.future = future
        self.queue = queue
        self.worker = worker

    def deliver(self, msg: dict) -> bool:
        """Hand over one message; True when this was the last one."""
        if self.queue is not None:
            self.queue.put_nowait(msg)
            return "end" in msg or "err" in msg
        if not self.future.done():
            self.future.set_result(msg)
        return True


class Stream:
    """An admitted streamed request whose first reply was a chunk: iterate ``rest()`` for the others.

    ``rest`` yields every message after the first up to the last (an ``end`` or an ``err``; a wait
    longer than ``gap_s``, or past the client's ``deadline``, becomes a 504 ``err``) and releases the
    request however it stops. A stream that stops before its last message (the client went away,
    or a deadline passed) sends the worker a cancel frame, so no more tokens are computed for it.
    """

    def __init__(self, dispatcher: Dispatcher, rid: str, reply: _Reply, first: dict, gap_s: float,
                 deadline: float | None = None):
        self.dispatcher = dispatcher
        self.rid = rid
        self.reply = reply
        self.first = first
        self.gap_s = gap_s
        self.deadline = deadline  # time.monotonic() by which the whole stream must end, if the client set one
        self.finished = "end" in first or "err" in first
        self.released = self.finished  # an empty stream was released by Dispatcher.stream

    def close(self) -> None:
        """Release the request (once), cancelling its work in the worker if it had not finished. ``rest``
        does this however it stops; a caller whose consumer may never have started iterating (a
        response abandoned before its first byte) calls it too, so nothing leaks."""
        if self.released:
            return
        self.released = True
        if not self.finished:
            self.dispatcher.cancel(self.rid, self.reply.worker)
        self.dispatcher._release(self.rid, self.reply.worker)

    async def rest(self) -> AsyncIterator[dict]:
        if self.released:  # an empty stream, or one already closed
            return
        try:
            while True:
                wait = self.dispatcher.wait_s(self.gap_s, self.deadline)
                try:
                    msg = await asyncio.wait_for(self.reply.queue.get(), wait)
                except asyncio.TimeoutError:
                    yield self.dispatcher.deadline(wait)
                    return
                if "end" in msg or "err" in msg:
                    self.finished = True
                yield msg
                if self.finished:
                    return
        finally:
            self.close()


class Dispatcher:
    def __init__(self, factory: ChannelFactory, admitted: Any, settings: ServerConfig, max_items: int | None):
        self.factory = factory
        self.admitted = admitted  # multiprocessing.Value shared by every API process (fork)
        self.settings = settings
        self.max_items = max_items  # items per queued request (the batcher's limit); None: no split
        self.channel: ApiChannel | None = None
        self.tracing_on = False
        self.inflight: dict[str, _Reply] = {}
        self._ids = itertools.count()
        self._background: set[asyncio.Task] = set()  # cancel frames being sent
        self._prefix = f"{os.getpid():x}-"

    async def start(self, consumer_id: int) -> None:
        self.tracing_on = tracing.enabled()
        self.channel = self.factory.api_channel(consumer_id)
        await self.channel.start(self._on_message)

    async def stop(self) -> None:
        for reply in self.inflight.values():
            reply.deliver({"err": {"status": 503, "error": "server is shutting down"}})
        if self.channel is not None:
            await self.channel.close()

    # --- replies from workers -------------------------------------------------------------------
    def _on_message(self, raw: bytes) -> None:
        try:
            frame = decode_reply(raw)
        except ProtocolError as exc:  # a worker bug, never a reason to take the API process down
            log.warning("dropping a malformed reply from a worker (%d bytes): %s", len(raw), exc)
            return
        msg = frame.body
        if frame.kind == "dead":
            self._fail_worker(msg["dead"])
            return
        rid = msg["id"]
        reply = self.inflight.get(rid)  # None: the late answer of a request already answered 504
        if reply is not None and reply.deliver(msg):
            self.inflight.pop(rid, None)

    def _fail_worker(self, worker: int) -> None:
        for rid, reply in list(self.inflight.items()):
            if reply.worker == worker:
                self.inflight.pop(rid, None)
                reply.deliver({"err": {
                    "status": 503, "error": "the inference worker handling this request died",
                    "detail": "retry the request; the worker is being restarted" if self.settings.restart_workers
                    else "the server is shutting down"}})

    # --- requests --------------------------------------------------------------------------------
    async def submit(self, items: list, timeout_s: float) -> dict:
        """A request larger than the batcher's limit is split into chunks that run as separate
        queued requests (possibly on several workers) and are joined back in order: 200, not 413.
        Each chunk takes a place in the queue; a request of more chunks than the queue can ever hold
        (``server.max_queue``) is refused with 413 rather than failing with 503 on every retry."""
        size = self.max_items
        if size is None or len(items) <= size:
            return await self._submit_one(items, timeout_s)
        chunks = -(-len(items) // size)
        if chunks > self.settings.max_queue:
            metrics.rejected("too_large")
            return {"err": {"status": 413, "error": f"request has {len(items)} items: {chunks} batches of "
                            f"batching.max_batch_size={size}, more than server.max_queue={self.settings.max_queue}",
                            "detail": {"field": "input"}}}
        parts = await asyncio.gather(*(self._submit_one(items[i:i + size], timeout_s)
                                       for i in range(0, len(items), size)))
        failed = next((p for p in parts if "err" in p), None)
        if failed is not None:
            return failed
        return {"out": [out for part in parts for out in part["out"]]}

    def _admit(self) -> dict | None:
        """Admission control: a bounded number of admitted-but-unanswered requests across processes.
        Returns the 503 answer when the bound is reached."""
        with self.admitted.get_lock():
            if self.admitted.value < self.settings.max_queue:
                self.admitted.value += 1
                return None
        metrics.rejected("queue_full")
        return {"err": {"status": 503, "error": "server is at capacity; retry later",
                        "detail": f"{self.settings.max_queue} requests are queued (server.max_queue)"}}

    def _release(self, rid: str, worker: int | None) -> None:
        self.inflight.pop(rid, None)
        self.channel.done(worker)
        with self.admitted.get_lock():
            self.admitted.value -= 1

    async def _enqueue(self, rid: str, items: list, timeout_s: float, reply_factory) -> _Reply:
        """Pick a worker, register the reply, send the request (``NoWorkerAvailable`` if none)."""
        worker = self.channel.pick_worker()
        reply = reply_factory(worker)
        self.inflight[rid] = reply
        now = time.monotonic()
        # A sampled request's span goes with it: the worker records its own spans under it.
        parent = tracing.sampled_current() if self.tracing_on else None
        await self.channel.send(encode_request(rid, self.channel.reply_to, items, now, now + timeout_s, parent),
                                worker)
        return reply

    @staticmethod
    def no_worker(exc: Exception) -> dict:
        metrics.rejected("not_ready")
        return {"err": {"status": 503, "error": "no inference worker is available; retry later", "detail": str(exc)}}

    @staticmethod
    def deadline(timeout_s: float) -> dict:
        metrics.rejected("deadline")
        return {"err": {"status": 504, "error": "deadline exceeded",
                        "detail": f"no answer within {timeout_s * 1000:.0f} ms "
                                  "(server.timeout_ms or X-Request-Timeout-Ms)"}}

    async def _submit_one(self, items: list, timeout_s: float) -> dict:
        refused = self._admit()
        if refused is not None:
            return refused
        rid = self._prefix + str(next(self._ids))
        loop = asyncio.get_running_loop()
        reply = None
        try:
            reply = await self._enqueue(rid, items, timeout_s, lambda w: _Reply(loop.create_future(), w))
            return await asyncio.wait_for(reply.future, timeout_s)
        except NoWorkerAvailable as exc:
            return self.no_worker(exc)
        except asyncio.TimeoutError:
            return self.deadline(timeout_s)
        finally:
            self._release(rid, reply.worker if reply is not None else None)

    @staticmethod
    def wait_s(gap_s: float, deadline: float | None) -> float:
        """How long the next message may take: the gap bound, or less if the client's deadline is nearer."""
        if deadline is None:
            return gap_s
        return max(0.0, min(gap_s, deadline - time.monotonic()))

    def cancel(self, rid: str, worker: int | None) -> None:
        """Tell ``worker`` to stop computing ``rid`` (its client is gone or was answered 504).
        Synchronous, so a stream's ``finally`` can call it while its task is being cancelled."""
        if self.channel is None:
            return

        async def send() -> None:
            try:
                await self.channel.send(encode_cancel(rid), worker)
            except (NoWorkerAvailable, OSError):
                return  # the worker is gone: nothing is being computed for it anyway
            self.channel.done(worker)  # a control frame is not a request: keep the routing counts even

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stream(self, items: list, gap_s: float, deadline: float | None = None) -> Stream | dict:
        """Admit and queue a streamed request; return its ``Stream`` once the first chunk is here, or
        the error that came first (admission, no worker, deadline, or the worker's own error). Each
        message may take ``gap_s`` (``server.timeout_ms``); ``deadline`` (monotonic), when the client
        set one, bounds the whole stream and reaches the worker, which drops the request past it."""
        refused = self._admit()
        if refused is not None:
            return refused
        rid = self._prefix + str(next(self._ids))
        reply = None
        wait = self.wait_s(gap_s, deadline)
        try:
            # Without a client deadline a stream may run as long as it keeps producing (each gap is
            # bounded here, and a stream that stops early cancels its work), so the worker gets none.
            worker_s = _NO_DEADLINE_S if deadline is None else deadline - time.monotonic()
            reply = await self._enqueue(rid, items, worker_s, lambda w: _Reply(None, w, asyncio.Queue()))
            first = await asyncio.wait_for(reply.queue.get(), wait)
        except (NoWorkerAvailable, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                self.cancel(rid, reply.worker)
            self._release(rid, reply.worker if reply is not None else None)
            return self.no_worker(exc) if isinstance(exc, NoWorkerAvailable) else self.deadline(wait)
        if "err" in first or "end" in first:
            self._release(rid, reply.worker)
            if "err" in first:
                return first
        return Stream(self, rid, reply, first, gap_s, deadline)

"""The API-process request path: decode -> cache -> admission -> queue -> wait -> encode -> cache.

One ``Gateway`` per API process, started in the app's lifespan (after fork). The error contract:
400/422 malformed input, 401 bad API key, 413 too large, 503 + Retry-After when the queue is full,
504 past the deadline, 500 only for a model failure. Every wait has a bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from framework import metrics, openai_compat, tracing
from framework.cache_key import cache_key, cache_scope
from framework.config import Resolved
from framework.errors import RequestError
from framework.plugin import CacheRequest
from framework.transport.base import ApiChannel, ChannelFactory, NoWorkerAvailable
from framework.transport.protocol import ProtocolError, decode_reply, encode_request

log = logging.getLogger("hydraserve.http")

TIMEOUT_HEADER = "x-request-timeout-ms"
_MAX_LATE = 1024  # timed-out sampled requests remembered for their worker's late answer
JSON = "application/json"
ROUTES = ("/predict", "/v1/embeddings")  # the inference routes (server.py mounts them)


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type=JSON, headers=headers)


def error_response(status: int, error: str, detail: Any = None, headers: dict | None = None) -> Response:
    body: dict = {"error": error}
    if detail is not None:
        body["detail"] = detail
    return json_response(body, status, headers)


class _Reply:
    """Waits for one answer (``future``) or, for a streamed answer, collects its messages (``queue``).

    For a sampled request it also keeps the request's span (``parent``), to record the worker's spans
    under when they arrive with the answer.
    """

    __slots__ = ("future", "queue", "worker", "parent")

    def __init__(self, future: asyncio.Future | None, worker: int | None, queue: asyncio.Queue | None = None):
        self.future = future
        self.queue = queue
        self.worker = worker
        self.parent: tracing.SpanRef | None = None

    def deliver(self, msg: dict) -> bool:
        """Hand over one message; True when this was the last one."""
        if self.queue is not None:
            self.queue.put_nowait(msg)
            return "end" in msg or "err" in msg
        if not self.future.done():
            self.future.set_result(msg)
        return True


class Gateway:
    def __init__(self, resolved: Resolved, factory: ChannelFactory, admitted: Any, output_dir: str):
        self.r = resolved
        self.factory = factory
        self.admitted = admitted  # multiprocessing.Value shared by every API process (fork)
        self.output_dir = output_dir
        self.server = resolved.server
        self.model = resolved.model
        self.cache = resolved.cache
        self.max_items = resolved.batching.max_request_items()
        self.channel: ApiChannel | None = None
        self.inflight: dict[str, _Reply] = {}
        self._late: dict[str, _Reply] = {}  # sampled requests answered 504 whose worker may still answer
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-"
        self.scope = ""
        self._span_flusher: asyncio.Task | None = None

    # --- lifecycle (inside the API process) -------------------------------------------------
    async def start(self, consumer_id: int) -> None:
        from framework.lifecycle import die_with_parent, tune_gc

        die_with_parent()  # this API process must not keep serving the port after the server is gone
        tracing.init_tracing(self.r.tracing, self.r.resource_attributes(), self.output_dir)
        self.tracing_on = tracing.enabled()
        # Each route's server span name and attributes at its start, built once (url.path is the
        # route: these routes match one path exactly).
        self._span_start = {route: (f"POST {route}", {"http.request.method": "POST", "http.route": route,
                                                      "url.path": route, "server.port": self.server.port})
                            for route in ROUTES}
        if self.tracing_on:
            self._span_flusher = asyncio.get_running_loop().create_task(self._flush_spans_periodically())
        self.cache_on = self.cache.enabled
        self.cache_blocks = self.cache.lookup_may_block
        self.streams = self.model.streaming()
        if self.cache_on:
            self.cache.open()
            self.scope = cache_scope(self.model.identity(), self.r.raw["quantization"], self.r.raw["model"])
        self.channel = self.factory.api_channel(consumer_id)
        await self.channel.start(self._on_message)
        tune_gc(self.server.gc_freeze, self.server.gc_thresholds)  # start-up is done in this process

    @staticmethod
    async def _flush_spans_periodically() -> None:
        # The file exporter writes from the thread that records spans (no thread of its own): under
        # light traffic this timer on the event loop writes the spans a full chunk would have.
        interval = tracing.flush_interval_s() or 0.5
        while True:
            await asyncio.sleep(interval / 2)
            tracing.flush_if_due()

    async def stop(self) -> None:
        if self._span_flusher is not None:
            self._span_flusher.cancel()
        for reply in self.inflight.values():
            reply.deliver({"err": {"status": 503, "error": "server is shutting down"}})
        if self.channel is not None:
            await self.channel.close()
        if self.cache_on:
            self.cache.close()
        tracing.shutdown()

    def _on_message(self, raw: bytes) -> None:
        try:
            frame = decode_reply(raw)
        except ProtocolError as exc:  # a worker bug, never a reason to take the API process down
            log.warning("dropping a malformed reply from a worker (%d bytes): %s", len(raw), exc)
            return
        msg, spans = frame.body, frame.spans
        if frame.kind == "dead":
            self._fail_worker(msg["dead"])
            return
        rid = msg["id"]
        reply = self.inflight.get(rid)
        waiting = reply is not None
        if not waiting:  # the late answer of a request already answered 504 (or of nobody's)
            reply = self._late.pop(rid, None)
        if spans and reply is not None:
            # The worker's spans of a sampled request, under the request's span. They stay the JSON
            # the worker wrote (protocol.attach_spans): the file exporter writes them as they are.
            tracing.record_tree(reply.parent, spans)
        if waiting and reply.deliver(msg):
            self.inflight.pop(rid, None)

    def _fail_worker(self, worker: int) -> None:
        for rid, reply in list(self.inflight.items()):
            if reply.worker == worker:
                self.inflight.pop(rid, None)
                reply.deliver({"err": {
                    "status": 503, "error": "the inference worker handling this request died",
                    "detail": "retry the request; the worker is being restarted" if self.server.restart_workers
                    else "the server is shutting down"}})

    # --- request handling ---------------------------------------------------------------------
    async def _read_json(self, request: Request) -> dict:
        limit = self.server.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"request body is {length} bytes; the limit is {limit} (server.max_body_bytes)",
                               status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body exceeds {limit} bytes (server.max_body_bytes)", status=413)
            chunks.append(chunk)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}", status=400) from None
        if not isinstance(body, dict):
            raise RequestError(f"body must be a JSON object, got {type(body).__name__}", status=400)
        return body

    def _timeout_s(self, request: Request) -> float:
        limit = self.server.timeout_ms
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise RequestError(f"header X-Request-Timeout-Ms must be a number of milliseconds, got {asked!r}",
                                   field="X-Request-Timeout-Ms", status=400) from None
            if value <= 0:
                raise RequestError("header X-Request-Timeout-Ms must be > 0", field="X-Request-Timeout-Ms",
                                   status=400)
            limit = min(limit, value)
        return limit / 1000.0

    async def predict(self, request: Request) -> Response:
        return await self._handle(request, "/predict")

    async def embeddings(self, request: Request) -> Response:
        return await self._handle(request, "/v1/embeddings")

    async def _handle(self, request: Request, route: str) -> Response:
        started = time.monotonic()
        metrics.request_started()
        status = 500
        span = None
        if self.tracing_on:
            name, attributes = self._span_start[route]
            span = tracing.start_request(name, request.scope["headers"], attributes)
        try:
            try:
                response = await self._serve(request, route)
            except Exception:  # a bug must still answer with the JSON error contract, not a bare 500
                log.exception("unhandled error on %s", route)
                response = error_response(500, "internal server error", "see the server log")
            status = response.status_code
            if span is not None:  # raw append: MutableHeaders re-scans the header list on every set
                response.raw_headers.append((b"traceparent", span.header))
            return response
        finally:
            metrics.request_finished()
            metrics.observe_request(route, status, time.monotonic() - started)
            if span is not None:
                span.end(status)

    async def _serve(self, request: Request, route: str) -> Response:
        # The API key was checked before any route (framework.security.ApiKeyMiddleware).
        try:
            body = await self._read_json(request)
            timeout_s = self._timeout_s(request)
            if route == "/v1/embeddings":
                model_body, fmt = openai_compat.request_items(body)
                items = self.model.decode(model_body)
            else:
                fmt, items = None, self.model.decode(body)
        except RequestError as exc:
            return json_response(exc.to_body(), exc.status)

        if self.streams:
            return await self._stream(items, body, timeout_s)

        lookup = None
        if self.cache_on:
            if "no-cache" in request.headers.get("cache-control", ""):
                metrics.cache_lookup("bypass")
                x_cache = "bypass"
            else:
                scope = self._request_scope(route, body)
                lookup = CacheRequest(cache_key(scope, items), self.model.texts(items), scope)
                hit = await self._cache_get(lookup)
                if hit is not None:
                    metrics.cache_lookup(hit.kind)
                    return Response(hit.value, media_type=JSON, headers={"X-Cache": hit.kind})
                metrics.cache_lookup("miss")
                x_cache = "miss"

        result = await self._submit_split(items, timeout_s)
        if "err" in result:
            return self._error(result)
        outputs = result["out"]
        if route == "/v1/embeddings":
            payload = openai_compat.response(outputs, fmt, body.get("model") or self.model.identity()["model"])
        else:
            payload = self.model.encode(outputs, body)
        data = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        if not self.cache_on:
            return Response(data, media_type=JSON)
        # The store runs after the answer is sent, so a miss does not wait for SQLite writes.
        background = BackgroundTask(self._cache_put, lookup, data) if lookup is not None else None
        return Response(data, media_type=JSON, headers={"X-Cache": x_cache}, background=background)

    def _request_scope(self, route: str, body: dict) -> str:
        # encode() may read more of the body than the items (echo answers "hi" and ["hi"] differently,
        # /v1/embeddings repeats body["model"]): every other field and the input's shape join the key.
        rest = {k: v for k, v in body.items() if k != "input"}
        rest["input"] = type(body.get("input")).__name__
        return self.scope + route + orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode()

    async def _cache_call(self, fn, *args):
        # A semantic lookup embeds text (milliseconds): off the event loop. Exact lookups stay inline.
        if self.cache_blocks:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def _cache_get(self, lookup: CacheRequest):
        if not self.tracing_on:
            return await self._cache_call(self.cache.get, lookup)
        start_ns = time.time_ns()
        hit = await self._cache_call(self.cache.get, lookup)
        tracing.record("cache.lookup", tracing.current(), start_ns, time.time_ns(),
                       {"cache.result": hit.kind if hit else "miss"})
        return hit

    async def _cache_put(self, lookup: CacheRequest, data: bytes) -> None:
        try:
            await self._cache_call(self.cache.put, lookup, data)
        except Exception:  # a cache that cannot store must not fail the answer
            log.warning("cache put failed", exc_info=True)

    async def _submit_split(self, items: list, timeout_s: float) -> dict:
        """A request larger than the batcher's limit is split into chunks that run as separate
        queued requests (possibly on several workers) and are joined back in order: 200, not 413.
        Each chunk takes a place in the queue; a request of more chunks than the queue can ever hold
        (``server.max_queue``) is refused with 413 rather than failing with 503 on every retry."""
        size = self.max_items
        if size is None or len(items) <= size:
            return await self._submit(items, timeout_s)
        chunks = -(-len(items) // size)
        if chunks > self.server.max_queue:
            metrics.rejected("too_large")
            return {"err": {"status": 413, "error": f"request has {len(items)} items: {chunks} batches of "
                            f"batching.max_batch_size={size}, more than server.max_queue={self.server.max_queue}",
                            "detail": {"field": "input"}}}
        parts = await asyncio.gather(*(self._submit(items[i:i + size], timeout_s)
                                       for i in range(0, len(items), size)))
        failed = next((p for p in parts if "err" in p), None)
        if failed is not None:
            return failed
        return {"out": [out for part in parts for out in part["out"]]}

    def _admit(self) -> dict | None:
        """Admission control: a bounded number of admitted-but-unanswered requests across processes.
        Returns the 503 answer when the bound is reached."""
        with self.admitted.get_lock():
            if self.admitted.value < self.server.max_queue:
                self.admitted.value += 1
                return None
        metrics.rejected("queue_full")
        return {"err": {"status": 503, "error": "server is at capacity; retry later",
                        "detail": f"{self.server.max_queue} requests are queued (server.max_queue)"}}

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
        sampled = False
        if self.tracing_on:
            parent = tracing.current()
            if parent is not None and parent.sampled:  # the worker sends its span timings back with the answer
                sampled = True
                reply.parent = parent
        await self.channel.send(encode_request(rid, self.channel.reply_to, items, now, now + timeout_s, sampled),
                                worker)
        return reply

    @staticmethod
    def _no_worker(exc: Exception) -> dict:
        metrics.rejected("not_ready")
        return {"err": {"status": 503, "error": "no inference worker is available; retry later", "detail": str(exc)}}

    @staticmethod
    def _deadline(timeout_s: float) -> dict:
        metrics.rejected("deadline")
        return {"err": {"status": 504, "error": "deadline exceeded",
                        "detail": f"no answer within {timeout_s * 1000:.0f} ms "
                                  "(server.timeout_ms or X-Request-Timeout-Ms)"}}

    async def _submit(self, items: list, timeout_s: float) -> dict:
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
            return self._no_worker(exc)
        except asyncio.TimeoutError:
            self._expect_late(rid, reply)
            return self._deadline(timeout_s)
        finally:
            self._release(rid, reply.worker if reply is not None else None)

    def _expect_late(self, rid: str, reply: _Reply | None) -> None:
        """A sampled request answered 504 may still be computed: keep what recording its worker
        spans takes, so its trace shows where the time went (the oldest are forgotten first)."""
        if reply is None or reply.parent is None:
            return
        self._late[rid] = reply
        if len(self._late) > _MAX_LATE:
            del self._late[next(iter(self._late))]

    async def _stream(self, items: list, body: dict, timeout_s: float) -> Response:
        """A streamed answer: newline-delimited JSON, one line per chunk as the worker produces it.
        The status code waits for the first chunk, so early errors keep their 4xx/5xx; the deadline
        bounds the wait for each chunk."""
        refused = self._admit()
        if refused is not None:
            return self._error(refused)
        rid = self._prefix + str(next(self._ids))
        reply = None
        try:
            reply = await self._enqueue(rid, items, timeout_s, lambda w: _Reply(None, w, asyncio.Queue()))
            first = await asyncio.wait_for(reply.queue.get(), timeout_s)
        except (NoWorkerAvailable, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                self._expect_late(rid, reply)
            self._release(rid, reply.worker if reply is not None else None)
            return self._error(self._no_worker(exc) if isinstance(exc, NoWorkerAvailable) else
                               self._deadline(timeout_s))
        if "err" in first:
            self._release(rid, reply.worker)
            return self._error(first)

        async def lines():
            msg = first
            try:
                while True:
                    if "err" in msg:
                        yield orjson.dumps({"error": msg["err"]["error"], "detail": msg["err"].get("detail")}) + b"\n"
                        return
                    if "end" in msg:
                        return
                    yield orjson.dumps(self.model.encode_chunk(msg["chunk"], body),
                                       option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
                    msg = await asyncio.wait_for(reply.queue.get(), timeout_s)
            except asyncio.TimeoutError:
                yield orjson.dumps(self._deadline(timeout_s)["err"]) + b"\n"
            finally:
                self._release(rid, reply.worker)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def _error(self, result: dict) -> Response:
        err = result["err"]
        headers = {"Retry-After": str(self.server.retry_after_s)} if err["status"] == 503 else None
        return error_response(err["status"], err["error"], err.get("detail"), headers)

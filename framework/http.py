"""The HTTP side of the API process: routes, bodies, deadlines' header, the cache, status codes.

One ``Gateway`` per API process, started in the app's lifespan (after fork): decode -> cache ->
dispatch -> encode -> cache. What happens between decoded items and the worker's answer (admission,
the in-flight table, deadlines, split/join, streams) is the ``Dispatcher``'s (``framework/dispatch.py``);
the gateway maps its results onto the error contract: 400/422 malformed input, 401 bad API key,
413 too large, 503 + Retry-After when the queue is full, 504 past the deadline, 500 only for a
model failure. Every wait has a bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from framework import metrics, openai_compat, tracing
from framework.cache_key import cache_key, cache_scope
from framework.config import Resolved
from framework.connections import BODY_TIMED_OUT
from framework.dispatch import Dispatcher
from framework.errors import RequestError
from framework.openai_generation import error_from_request_error
from framework.openai_routes import dispatcher_error
from framework.plugin import CacheRequest
from framework.transport.base import ChannelFactory

log = logging.getLogger("hydraserve.http")

TIMEOUT_HEADER = "x-request-timeout-ms"
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


class Gateway:
    def __init__(self, resolved: Resolved, factory: ChannelFactory, admitted: Any, output_dir: str):
        self.r = resolved
        self.output_dir = output_dir
        self.server = resolved.server
        self.model = resolved.model
        self.cache = resolved.cache
        self.dispatcher = Dispatcher(factory, admitted, resolved.server, resolved.batching.max_request_items())
        self.scope = ""
        self.tracing_on = False
        self.generation = None  # the OpenAI generation routes, for a generative model
        if self.model.task == "chat":
            from framework.openai_routes import GenerationRoutes

            self.generation = GenerationRoutes(self)

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
        self.cache_on = self.cache.enabled
        self.cache_blocks = self.cache.lookup_may_block
        self.streams = self.model.streaming()
        if self.cache_on:
            self.cache.open()
            # a hardware plugin that changes the numbers itself (hardware.runtime=onnxruntime with its int8)
            # says so through numerics(): answers computed that way never share entries with torch's
            numerics = getattr(self.r.hardware, "numerics", None)
            self.scope = cache_scope(self.model.identity(), self.r.raw["quantization"], self.r.raw["model"],
                                     numerics() if callable(numerics) else None)
        await self.dispatcher.start(consumer_id)
        tune_gc(self.server.gc_freeze, self.server.gc_thresholds)  # start-up is done in this process

    async def stop(self) -> None:
        await self.dispatcher.stop()
        if self.cache_on:
            self.cache.close()
        tracing.shutdown()

    # --- request handling ---------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict:
        limit = self.server.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"request body is {length} bytes; the limit is {limit} (server.max_body_bytes)",
                               status=413)
        chunks, size = [], 0
        receive, scope = request.receive, request.scope
        while True:  # request.stream(), plus the connection layer's body timeout (framework/connections.py)
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left mid-body
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"request body exceeds {limit} bytes (server.max_body_bytes)", status=413)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
            if BODY_TIMED_OUT in scope:
                raise RequestError(f"the request body did not arrive within {scope[BODY_TIMED_OUT]} s "
                                   "(server.body_timeout_s)", field="body", status=408)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"body is not valid JSON: {exc}", status=400) from None
        if not isinstance(body, dict):
            raise RequestError(f"body must be a JSON object, got {type(body).__name__}", status=400)
        return body

    def _timeout_s(self, request: Request) -> float:
        asked = self.client_deadline_s(request)
        limit = self.server.timeout_ms / 1000.0
        return limit if asked is None else min(limit, asked)

    @staticmethod
    def client_deadline_s(request: Request) -> float | None:
        """The client's deadline (``X-Request-Timeout-Ms``) in seconds, ``None`` when it set none."""
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise RequestError(f"header X-Request-Timeout-Ms must be a number of milliseconds, got {asked!r}",
                                   field="X-Request-Timeout-Ms", status=400) from None
            if value <= 0 or value != value:
                raise RequestError("header X-Request-Timeout-Ms must be > 0", field="X-Request-Timeout-Ms",
                                   status=400)
            return value / 1000.0
        return None

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
            except ClientDisconnect:  # the client's choice, not a server error: counted, not logged loudly
                metrics.client_disconnected()
                log.debug("client disconnected before its request body was read on %s", route)
                response = error_response(499, "client closed the connection")  # nobody reads it
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
            body = await self.read_json(request)
            timeout_s = self._timeout_s(request)
            if route == "/v1/embeddings":
                model_body, fmt = openai_compat.request_items(body)
                items = self.model.decode(model_body)
            else:
                fmt, items = None, self.model.decode(body)
        except RequestError as exc:
            if route == "/v1/embeddings":  # OpenAI's error object, so its client shows the message
                status, err = error_from_request_error(exc)
                return json_response(err, status)
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

        result = await self.dispatcher.submit(items, timeout_s)
        if "err" in result:
            if route == "/v1/embeddings":
                return dispatcher_error(result["err"], self.server.retry_after_s)
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

    async def _lookup(self, lookup: CacheRequest):
        if self.cache_blocks:  # a front hit answers on the event loop; only a front miss takes a thread
            hit = self.cache.peek(lookup)
            if hit is not None:
                return hit
        return await self._cache_call(self.cache.get, lookup)

    async def _cache_get(self, lookup: CacheRequest):
        if not self.tracing_on:
            return await self._lookup(lookup)
        start_ns = time.time_ns()
        hit = await self._lookup(lookup)
        tracing.record("cache.lookup", tracing.current(), start_ns, time.time_ns(),
                       {"cache.result": hit.kind if hit else "miss"})
        return hit

    async def _cache_put(self, lookup: CacheRequest, data: bytes) -> None:
        try:
            await self._cache_call(self.cache.put, lookup, data)
        except Exception:  # a cache that cannot store must not fail the answer
            log.warning("cache put failed", exc_info=True)

    async def _stream(self, items: list, body: dict, timeout_s: float) -> Response:
        """A streamed answer: newline-delimited JSON, one line per chunk as the worker produces it.
        The status code waits for the first chunk, so early errors keep their 4xx/5xx; an error after
        it (a deadline between chunks included) is the stream's last line."""
        stream = await self.dispatcher.stream(items, timeout_s)
        if isinstance(stream, dict):
            return self._error(stream)

        def line(msg: dict) -> bytes:
            if "err" in msg:
                return orjson.dumps({"error": msg["err"]["error"], "detail": msg["err"].get("detail")}) + b"\n"
            return orjson.dumps(self.model.encode_chunk(msg["chunk"], body), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

        async def lines():
            if "chunk" in stream.first:
                yield line(stream.first)
            async for msg in stream.rest():
                if "end" not in msg:
                    yield line(msg)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def _error(self, result: dict) -> Response:
        err = result["err"]
        headers = {"Retry-After": str(self.server.retry_after_s)} if err["status"] == 503 else None
        return error_response(err["status"], err["error"], err.get("detail"), headers)

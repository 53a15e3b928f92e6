"""OpenAI's generation routes over HTTP: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

The HTTP side of generated text, as ``Gateway`` is for one-shot models: read and validate the body
(``framework/openai_generation.py``), hand the prompt to the ``Dispatcher`` as a stream, and turn
the worker's chunks into server-sent events (``stream: true``) or one JSON answer. The status code
waits for the first token, so every error before it keeps its 4xx/5xx and OpenAI's error object;
an error after it (a deadline, a worker that died) is the stream's last event before ``[DONE]``.

Deadlines: ``server.timeout_ms`` bounds the wait for the first token and for each later piece (a
generation may run as long as it keeps producing); ``X-Request-Timeout-Ms`` bounds the whole
request (504 before the first token, an error event after it). A stream that stops early, because
its client went away or its deadline passed, cancels its sequence in the worker.

The response cache (``cache=memory|disk|...``) answers deterministic requests only, greedy or seeded,
keyed on the prompt and every sampling parameter; a streamed request's hit is replayed as SSE. A
sampled answer is never cached, and neither is one cut by a deadline or an error.

Time to first token, the gaps between pieces and the whole request go to ``/metrics`` as the client
sees them (measured here, after the network hop from the worker); the request's span carries the
OpenTelemetry GenAI attributes and, when sampled, the worker's queue/prefill/decode spans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from framework import metrics, tracing
from framework.cache_key import cache_key
from framework.dispatch import Stream
from framework.errors import RequestError
from framework.openai_generation import (
    SSE_DONE,
    GenerationSpec,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    error_from_request_error,
    models_list,
    new_id,
    parse_chat,
    parse_completion,
    sse,
    usage_chunk,
)
from framework.plugin import CacheRequest

if TYPE_CHECKING:
    from framework.http import Gateway

log = logging.getLogger("hydraserve.http")

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if status == 503 and retry_after_s else None
    return json_response(error_body(status, message, param, code), status, headers)


def dispatcher_error(err: dict, retry_after_s: int) -> Response:
    """A dispatcher or worker error (``{"status", "error", "detail"}``) as OpenAI's error object."""
    detail = err.get("detail")
    param = detail.get("field") if isinstance(detail, dict) else None
    message = err["error"] if not isinstance(detail, str) else f"{err['error']}: {detail}"
    return openai_error(err["status"], message, param, retry_after_s=retry_after_s)


def _stream_error_event(err: dict) -> bytes:
    detail = err.get("detail")
    message = err["error"] if not isinstance(detail, str) else f"{err['error']}: {detail}"
    return sse(error_body(err["status"], message))


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` when it is done, however it ended: a body generator
    that never started has no ``finally`` to run, and its request must still be released."""

    def __init__(self, content: Any, on_close: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(receive) -> None:
    """Returns when the client closes its connection (its body was read: only a disconnect comes next).
    A plain answer has no stream whose failed write would tell, so this watches for it."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Answer:
    """What a generation has produced so far, as the client sees it."""

    def __init__(self, started: float):
        self.started = started
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.gaps: list[float] = []

    def take(self, chunk: dict) -> None:
        now = time.monotonic()
        if chunk.get("t"):
            if self.first_at is None:
                self.first_at = now
            elif self.last_at is not None:
                self.gaps.append(now - self.last_at)
            self.last_at = now
            self.text.append(chunk["t"])
        self.completion_tokens = int(chunk.get("n", self.completion_tokens))
        if "f" in chunk:
            self.finish_reason = chunk["f"]
            self.prompt_tokens = int(chunk.get("p", 0))


@dataclass(frozen=True)
class CachedAnswer:
    """What the response cache keeps of a generated answer (ids and timestamps are made per reply)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def to_bytes(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer | None:
        """The stored answer; ``None`` (a miss) for anything that is not one: the cache folder is untrusted."""
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(d, dict) and isinstance(d.get("text"), str) and d.get("finish_reason") in ("stop", "length")
                and type(d.get("prompt_tokens")) is int and type(d.get("completion_tokens")) is int):
            return None
        return cls(d["text"], d["finish_reason"], d["prompt_tokens"], d["completion_tokens"])


class GenerationRoutes:
    """The OpenAI generation endpoints of one API process, on the gateway's body reader and dispatcher."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.model = gateway.model
        self.served_name = self.model.served_name()
        self.created = int(time.time())
        self._background: set[asyncio.Task] = set()  # cache stores after the answer went out
        self._span_start = {route: (f"POST {route}", {"http.request.method": "POST", "http.route": route,
                                                      "url.path": route,
                                                      "server.port": gateway.server.port})
                            for route in (CHAT, COMPLETIONS)}

    async def models(self, request: Request) -> Response:
        return json_response(models_list(self.served_name, self.created))

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, CHAT, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, COMPLETIONS, parse_completion)

    # --- one request ------------------------------------------------------------------------------
    async def _handle(self, request: Request, route: str, parse) -> Response:
        started = time.monotonic()
        metrics.request_started()
        span = None
        if self.gateway.tracing_on:
            name, attributes = self._span_start[route]
            span = tracing.start_request(name, request.scope["headers"], attributes)
        status, streaming = 500, False
        try:
            try:
                response = await self._serve(request, route, parse, started, span)
                streaming = isinstance(response, StreamingResponse)
            except ClientDisconnect:
                metrics.client_disconnected()
                response = openai_error(499, "client closed the connection")
            except Exception:
                log.exception("unhandled error on %s", route)
                response = openai_error(500, "internal server error; see the server log")
            status = response.status_code
            if span is not None:
                response.raw_headers.append((b"traceparent", span.header))
            return response
        finally:
            if streaming:  # the stream's last piece ends the request's metrics and span
                if span is not None:
                    span.detach()
            else:
                self._finished(route, status, started, span)

    @staticmethod
    def _finished(route: str, status: int, started: float, span: Any) -> None:
        metrics.request_finished()
        metrics.observe_request(route, status, time.monotonic() - started)
        if span is not None:
            span.end(status)

    async def _serve(self, request: Request, route: str, parse, started: float, span: Any) -> Response:
        gateway = self.gateway
        try:
            body = await gateway.read_json(request)
            spec: GenerationSpec = parse(body)
            deadline_s = gateway.client_deadline_s(request)
        except RequestError as exc:
            status, err = error_from_request_error(exc)
            return json_response(err, status)
        if spec.model is not None and spec.model != self.served_name:
            return openai_error(404, f"the model '{spec.model}' does not exist; this server serves "
                                f"'{self.served_name}' (GET /v1/models)", "model", "model_not_found")
        if span is not None:
            span.attributes = {**span.attributes, **self._request_attributes(spec, route)}
        lookup = self._cache_request(request, spec, route)
        x_cache: dict[str, str] = {}
        if lookup is not None:
            hit = await gateway._cache_get(lookup)
            record = None if hit is None else CachedAnswer.from_bytes(hit.value)
            metrics.cache_lookup("hit" if record is not None else "miss")
            if record is not None:
                return self._replay(record, spec, route, started, span)
            x_cache = {"X-Cache": "miss"}
        elif gateway.cache_on:
            x_cache = {"X-Cache": "bypass"}
        deadline = None if deadline_s is None else started + deadline_s
        stream = await gateway.dispatcher.stream([spec.item()], gateway.server.timeout_ms / 1000.0, deadline)
        if isinstance(stream, dict):
            return dispatcher_error(stream["err"], gateway.server.retry_after_s)
        rid = new_id("chat" if route == CHAT else "completion")
        if spec.stream:
            done = {"finished": False}

            def abandoned() -> None:
                # The body was never (fully) iterated (the client left before the first byte went out):
                # release the request and end its metrics and span here, as _events would have.
                stream.close()
                if not done["finished"]:
                    done["finished"] = True
                    self._finished(route, 499, started, span)

            return _ClosingStreamingResponse(
                self._events(stream, spec, route, rid, started, span, lookup, done), abandoned,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **x_cache})
        answer = _Answer(started)
        collect = asyncio.ensure_future(self._collect(stream, answer))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left first: stop its sequence
                collect.cancel()
                stream.close()  # the collecting task may not have started: Stream.rest would not run
        if not collect.done() or collect.cancelled():
            raise ClientDisconnect()
        err = collect.result()
        if err is not None:
            self._observe(answer, None)
            return dispatcher_error(err, gateway.server.retry_after_s)
        self._observe(answer, span, rid)
        self._store(lookup, answer)
        build = chat_response if route == CHAT else completion_response
        return json_response(build(rid, self.created, self.served_name, "".join(answer.text),
                                   answer.finish_reason or "stop", answer.prompt_tokens, answer.completion_tokens),
                             headers=x_cache or None)

    async def _collect(self, stream: Stream, answer: _Answer) -> dict | None:
        """Read a whole answer into ``answer``; returns the error that ended it, if one did."""
        async for msg in self._messages(stream):
            if "err" in msg:
                return msg["err"]
            if "chunk" in msg:
                answer.take(msg["chunk"])
        return None

    @staticmethod
    async def _messages(stream: Stream) -> AsyncIterator[dict]:
        yield stream.first
        async for msg in stream.rest():
            yield msg

    async def _events(self, stream: Stream, spec: GenerationSpec, route: str, rid: str, started: float,
                      span: Any, lookup: CacheRequest | None, done: dict) -> AsyncIterator[bytes]:
        """The SSE body: the answer's pieces as they come, its finish, its usage if asked, ``[DONE]``."""
        chat = route == CHAT
        created, model = self.created, self.served_name
        answer = _Answer(started)
        status = 200
        try:
            if chat:
                yield sse(chat_chunk(rid, created, model, role=True))
            async for msg in self._messages(stream):
                if "err" in msg:
                    status = msg["err"]["status"]
                    yield _stream_error_event(msg["err"])
                    break
                if "chunk" not in msg:
                    continue
                chunk = msg["chunk"]
                answer.take(chunk)
                text = chunk.get("t")
                if text:
                    yield sse(chat_chunk(rid, created, model, text) if chat else completion_chunk(rid, created, model,
                                                                                                    text))
                if "f" in chunk:
                    yield sse(chat_chunk(rid, created, model, finish_reason=chunk["f"]) if chat
                              else completion_chunk(rid, created, model, "", finish_reason=chunk["f"]))
                    if spec.include_usage:
                        yield sse(usage_chunk("chat" if chat else "completion", rid, created, model,
                                              answer.prompt_tokens, answer.completion_tokens))
            yield SSE_DONE
            if status == 200:
                self._store(lookup, answer)
        finally:
            self._observe(answer, span, rid)
            if span is not None and status != 200:
                span.attributes = {**span.attributes, "error.type": str(status)}
            if not done["finished"]:
                done["finished"] = True
                self._finished(route, 200, started, span)

    # --- the response cache: deterministic requests only -------------------------------------------
    def _cache_request(self, request: Request, spec: GenerationSpec, route: str) -> CacheRequest | None:
        """The exact-cache lookup of a request whose answer is determined by its body: greedy
        (temperature 0) or seeded. ``None`` when the cache is off, bypassed, or the answer is sampled."""
        gateway = self.gateway
        if not gateway.cache_on or not (spec.temperature == 0 or spec.seed is not None):
            return None
        if "no-cache" in request.headers.get("cache-control", ""):
            metrics.cache_lookup("bypass")
            return None
        # Everything that decides the answer: the prompt and the sampling parameters (stream and
        # include_usage only change how it is sent, so a streamed and a plain request share it).
        item = spec.item()
        if spec.temperature == 0:
            item.pop("seed", None)  # greedy ignores the seed
        scope = gateway.scope + route
        return CacheRequest(cache_key(scope, [item]), None, scope)

    def _store(self, lookup: CacheRequest | None, answer: _Answer) -> None:
        if lookup is None or answer.finish_reason not in ("stop", "length"):
            return  # never a cut or failed answer
        data = CachedAnswer("".join(answer.text), answer.finish_reason, answer.prompt_tokens,
                            answer.completion_tokens).to_bytes()
        task = asyncio.get_running_loop().create_task(self.gateway._cache_put(lookup, data))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _replay(self, record: CachedAnswer, spec: GenerationSpec, route: str, started: float, span: Any) -> Response:
        """A cached answer, as a plain answer or replayed as a stream (one content chunk)."""
        chat = route == CHAT
        rid = new_id("chat" if chat else "completion")
        created, model = self.created, self.served_name
        if span is not None:
            span.attributes = {**span.attributes, "gen_ai.response.id": rid, "gen_ai.response.model": model,
                               "gen_ai.usage.input_tokens": record.prompt_tokens,
                               "gen_ai.usage.output_tokens": record.completion_tokens,
                               "gen_ai.response.finish_reasons": [record.finish_reason], "hydraserve.cache": "hit"}
        if not spec.stream:
            build = chat_response if chat else completion_response
            return json_response(build(rid, created, model, record.text, record.finish_reason, record.prompt_tokens,
                                       record.completion_tokens), headers={"X-Cache": "hit"})
        events = [sse(chat_chunk(rid, created, model, role=True))] if chat else []
        if record.text:
            events.append(sse(chat_chunk(rid, created, model, record.text) if chat
                              else completion_chunk(rid, created, model, record.text)))
        events.append(sse(chat_chunk(rid, created, model, finish_reason=record.finish_reason) if chat
                          else completion_chunk(rid, created, model, "", finish_reason=record.finish_reason)))
        if spec.include_usage:
            events.append(sse(usage_chunk("chat" if chat else "completion", rid, created, model,
                                          record.prompt_tokens, record.completion_tokens)))
        events.append(SSE_DONE)
        return Response(b"".join(events), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Cache": "hit"})

    def _observe(self, answer: _Answer, span: Any, rid: str | None = None) -> None:
        now = time.monotonic()
        ttft = None if answer.first_at is None else answer.first_at - answer.started
        metrics.observe_stream(ttft, answer.gaps, now - answer.started if answer.finish_reason else None)
        if span is not None and rid is not None:
            attrs = {**span.attributes, "gen_ai.response.id": rid, "gen_ai.response.model": self.served_name,
                     "gen_ai.usage.output_tokens": answer.completion_tokens}
            if answer.finish_reason:
                attrs["gen_ai.response.finish_reasons"] = [answer.finish_reason]
                attrs["gen_ai.usage.input_tokens"] = answer.prompt_tokens
            if ttft is not None:
                attrs["hydraserve.time_to_first_token_ms"] = round(ttft * 1000, 3)
            span.attributes = attrs

    def _request_attributes(self, spec: GenerationSpec, route: str) -> dict:
        """The GenAI semantic-convention attributes known from the request."""
        attrs: dict[str, Any] = {"gen_ai.operation.name": "chat" if route == CHAT else "text_completion",
                                 "gen_ai.provider.name": "hydraserve",
                                 "gen_ai.request.model": spec.model or self.served_name,
                                 "gen_ai.request.temperature": spec.temperature, "gen_ai.request.top_p": spec.top_p,
                                 "hydraserve.stream": spec.stream}
        if spec.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = spec.max_tokens
        if spec.seed is not None:
            attrs["gen_ai.request.seed"] = spec.seed
        if spec.stop:
            attrs["gen_ai.request.stop_sequences"] = list(spec.stop)
        return attrs

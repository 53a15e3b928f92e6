"""Streaming chat measurement: OpenAI ``/v1/chat/completions`` with ``"stream": true``.

Per request (all times from the request's *intended* send time, as for ``/predict``):

* ``ttft``: time to the first chunk whose ``delta.content`` is non-empty (the role-only first chunk
  does not count: no token has been produced yet);
* ``itl``: every gap between two consecutive content chunks (a chunk may hold several tokens, and
  chunks that arrive in one read have a gap of ~0: that is what the client saw);
* ``e2e``: to ``data: [DONE]`` (or the end of the body);
* ``output_tokens``: ``usage.completion_tokens`` of the final chunk (the workload asks for
  ``stream_options.include_usage``); without a usage chunk, the number of content chunks;
* ``tpot``: mean time per output token after the first, ``(e2e - ttft) / (output_tokens - 1)``.

Outcomes that are not a success: an HTTP status outside 2xx (the JSON error's message is kept),
``stream_error`` (an ``data: {"error": ...}`` event after the stream started), ``incomplete_stream``
(the body ended without ``[DONE]``), ``timeout`` and ``connect_error``.

Goodput under the SLO (``bench.slo``): a request counts when it succeeded, its TTFT is at most
``ttft_ms`` and its token pace is at most ``itl_ms``, where the pace is its TPOT (default,
``itl_metric: tpot``, as vLLM's and DistServe's goodput) or its largest gap between chunks
(``itl_metric: max_itl``: stricter, one stall fails the request). TPOT is the default because a
chunk can carry several tokens, so one chunk gap is not one token's latency, and a single scheduler
hiccup should not fail a request whose reader saw a steady stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
from hdrh.histogram import HdrHistogram

from framework.bench.http_client import HttpProtocolError
from framework.bench.stats import OK_STATUSES, StageStats, _histogram, _record, _summary_ms

ITL_METRICS = ("tpot", "max_itl")
CDF_POINTS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 99.9, 100)
MAX_REQUEST_RECORDS = 100_000


@dataclass
class ChatResult:
    """What one streamed chat request did; times are ``time.perf_counter()`` seconds."""

    intended: float
    sent: float
    done: float = 0.0
    status: int | str = "connect_error"
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # the server's message (HTTP error body or the error event)
    saw_done: bool = False

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and self.status in OK_STATUSES

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.intended if self.chunk_times else None

    @property
    def e2e_s(self) -> float:
        return self.done - self.intended

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def max_itl_s(self) -> float | None:
        gaps = self.itls_s
        return max(gaps) if gaps else None

    @property
    def tpot_s(self) -> float | None:
        ttft, n = self.ttft_s, self.output_tokens
        if ttft is None or n < 2:
            return None
        return max(self.e2e_s - ttft, 0.0) / (n - 1)

    def record(self) -> dict:
        """A compact JSON-able row (``requests.jsonl``), times in ms."""
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 3)

        return {"status": self.status, "ttft_ms": ms(self.ttft_s), "e2e_ms": ms(self.e2e_s),
                "tpot_ms": ms(self.tpot_s), "max_itl_ms": ms(self.max_itl_s), "chunks": len(self.chunk_times),
                "output_tokens": self.output_tokens, "tokens_from": "usage" if self.usage_tokens is not None
                else "chunks", "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason,
                "send_lag_ms": ms(max(self.sent - self.intended, 0.0)), "error": self.error}


@dataclass
class Slo:
    ttft_ms: float = 1000.0
    itl_ms: float = 100.0
    itl_metric: str = "tpot"  # tpot | max_itl


def meets_slo(result: ChatResult, slo: Slo) -> bool:
    """The goodput rule of the module docstring. A one-token answer has no pace: TTFT alone decides."""
    if not result.ok or result.ttft_s is None or result.ttft_s * 1000.0 > slo.ttft_ms:
        return False
    pace = result.tpot_s if slo.itl_metric == "tpot" else result.max_itl_s
    return pace is None or pace * 1000.0 <= slo.itl_ms


def goodput(results: list[ChatResult], window_s: float, slo: Slo) -> float:
    """Requests/s that met the SLO over ``window_s`` seconds."""
    if window_s <= 0:
        return 0.0
    return sum(1 for r in results if meets_slo(r, slo)) / window_s


# ---------------------------------------------------------------------------------------- SSE
class SseReader:
    """Incremental ``text/event-stream`` parser for OpenAI chat chunks; ``feed`` each body piece."""

    def __init__(self, result: ChatResult):
        self.r = result
        self._buf = b""
        self.events = 0

    def feed(self, data: bytes, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return
            event, self._buf = self._buf[:end], self._buf[end + 2:]
            self._event(event, now)

    def close(self, now: float) -> None:
        if self._buf.strip():
            self._event(self._buf, now)
            self._buf = b""

    def _event(self, event: bytes, now: float) -> None:
        lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if not lines:
            return  # comments (": ping") and other fields
        self.events += 1
        data = b"\n".join(lines)
        if data.strip() == b"[DONE]":
            self.r.saw_done = True
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.r.error = self.r.error or f"not JSON: {data[:200]!r}"
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error") is not None:
            err = obj["error"]
            self.r.error = str(err.get("message") if isinstance(err, dict) else err)
            self.r.status = "stream_error"
            return
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.r.chunk_times.append(now)
                break
        for choice in obj.get("choices") or []:
            if choice.get("finish_reason"):
                self.r.finish_reason = choice["finish_reason"]
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.r.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.r.prompt_tokens = usage["prompt_tokens"]


def _error_message(body: bytes) -> str | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:300] or None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))[:300]
    if isinstance(obj, dict) and "detail" in obj:
        return str(obj["detail"])[:300]
    return str(obj)[:300]


async def stream_chat(conn, path: str, body: bytes, headers: dict[str, str] | None, intended: float,
                      timeout_s: float, method: str = "POST") -> ChatResult:
    """Send one streamed chat request on ``conn`` (a ``RawConnection`` or ``HttpxConnection``)."""
    from framework.bench.load import _timeout

    result = ChatResult(intended=intended, sent=time.perf_counter())
    reader = SseReader(result)
    head: list[bytes] = []  # the first pieces of the body: an error answer's JSON
    try:
        async with _timeout(timeout_s):
            status, _ = await conn.request_streaming(method, path, body, headers, _Tee(reader, head))
    except TimeoutError:
        result.status = "timeout"
    except (OSError, HttpProtocolError, asyncio.IncompleteReadError, ValueError):
        result.status = "connect_error"
    except Exception as exc:  # httpx errors and anything unexpected: counted, never fatal
        result.status = type(exc).__name__
    else:
        now = time.perf_counter()
        if status in OK_STATUSES:
            reader.close(now)
            if result.status != "stream_error":
                result.status = status if result.saw_done else "incomplete_stream"
        else:
            result.status = status
            result.chunk_times.clear()
            result.error = _error_message(b"".join(head))
    result.done = time.perf_counter()
    return result


class _Tee:
    """Parses each body piece as it arrives (timed on arrival) and keeps the first few."""

    def __init__(self, reader: SseReader, head: list[bytes]):
        self.reader, self.head = reader, head

    def __call__(self, piece: bytes) -> None:
        now = time.perf_counter()
        if len(self.head) < 16:
            self.head.append(piece)
        self.reader.feed(piece, now)


# -------------------------------------------------------------------------------------- stats
@dataclass
class ChatStageStats(StageStats):
    """``StageStats`` plus the token-level measurements; ``good`` counts requests within ``slo``."""

    slo: Slo = field(default_factory=Slo)
    ttft: HdrHistogram = field(default_factory=_histogram)
    itl: HdrHistogram = field(default_factory=_histogram)
    tpot: HdrHistogram = field(default_factory=_histogram)
    max_itl: HdrHistogram = field(default_factory=_histogram)
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    tokens_from: Counter = field(default_factory=Counter)
    finish_reasons: Counter = field(default_factory=Counter)
    error_messages: dict = field(default_factory=dict)  # status -> the first message seen
    requests: list = field(default_factory=list)  # ChatResult.record() rows

    def record_chat(self, r: ChatResult) -> None:
        good_before = self.good
        self.record(r.intended, r.sent, r.done, r.status)
        self.good = good_before + (1 if meets_slo(r, self.slo) else 0)
        if len(self.requests) < MAX_REQUEST_RECORDS:
            self.requests.append(r.record())
        if r.error and str(r.status) not in self.error_messages:
            self.error_messages[str(r.status)] = r.error
        if not r.ok:
            return
        if r.ttft_s is not None:
            _record(self.ttft, r.ttft_s)
        for gap in r.itls_s:
            _record(self.itl, gap)
        if r.tpot_s is not None:
            _record(self.tpot, r.tpot_s)
        if r.max_itl_s is not None:
            _record(self.max_itl, r.max_itl_s)
        self.output_tokens += r.output_tokens
        self.prompt_tokens += r.prompt_tokens or 0
        self.chunks += len(r.chunk_times)
        self.tokens_from["usage" if r.usage_tokens is not None else "chunks"] += 1
        if r.finish_reason:
            self.finish_reasons[r.finish_reason] += 1

    def summary(self) -> dict:
        out = super().summary()
        window = self.window_s()
        out["chat"] = {
            "slo": {"ttft_ms": self.slo.ttft_ms, "itl_ms": self.slo.itl_ms, "itl_metric": self.slo.itl_metric},
            "ttft_ms": _summary_ms(self.ttft),
            "itl_ms": _summary_ms(self.itl),
            "tpot_ms": _summary_ms(self.tpot),
            "max_itl_ms": _summary_ms(self.max_itl),
            "e2e_ms": out["latency_ms"],
            "requests_per_s": out["throughput"],
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens / window, 3) if window else 0.0,
            "output_tokens_per_request": round(self.output_tokens / self.ok, 2) if self.ok else None,
            "prompt_tokens": self.prompt_tokens,
            "content_chunks": self.chunks,
            "tokens_from": dict(self.tokens_from),
            "finish_reasons": dict(self.finish_reasons),
            "goodput": out["goodput"],
            "slo_attainment": out["slo_attainment"],
            "error_messages": dict(self.error_messages),
            "cdf": {"percentiles": list(CDF_POINTS), "ttft_ms": _cdf(self.ttft), "itl_ms": _cdf(self.itl)},
        }
        return out


def _cdf(hist: HdrHistogram) -> list[float] | None:
    if hist.get_total_count() == 0:
        return None
    return [hist.get_value_at_percentile(p) / 1000.0 for p in CDF_POINTS]

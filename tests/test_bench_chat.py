"""``hydraserve bench`` streamed chat: SSE client, TTFT/ITL/TPOT, goodput, chat workload, reports.

A fake OpenAI streaming server (raw asyncio, its own thread and loop) streams a known number of
content chunks with a known delay, chunked or close-delimited, and can fail before or mid-stream.
Timing asserts are loose (ordering and counts, wide bounds), never tight.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import orjson
import pytest

from framework.bench.chat import ChatResult, Slo, SseReader, goodput, meets_slo, stream_chat
from framework.bench.config import bench_settings
from framework.bench.http_client import RawConnection
from framework.bench.workload import build, chat_workload, dist_problems, load_jsonl, sample_length
from framework.config import compose
from framework.errors import ConfigError


class FakeOpenAI:
    """``POST /v1/chat/completions`` streams ``max_tokens`` tokens, ``per_chunk`` per SSE event,
    ``delay_s`` apart, in chunked encoding (``chunked=False``: no length, close-delimited).
    ``fail="503"``: a JSON error before the stream; ``fail="mid"``: an error event after 2 chunks.
    ``GET /v1/models`` lists ``fake-model``."""

    __test__ = False

    def __init__(self, delay_s: float = 0.02, per_chunk: int = 1, chunked: bool = True, fail: str | None = None,
                 first_delay_s: float = 0.05, usage: bool = True):
        self.delay_s, self.per_chunk, self.chunked, self.fail = delay_s, per_chunk, chunked, fail
        self.first_delay_s, self.usage = first_delay_s, usage
        self.bodies: list[dict] = []
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")), 0)
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path == "/v1/models":
                    await self._json(writer, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                    continue
                req = orjson.loads(body)
                self.bodies.append(req)
                if self.fail == "503":
                    await self._json(writer, 503, {"error": {"message": "server overloaded", "type": "overloaded",
                                                             "param": None, "code": 503}})
                    continue
                if not await self._stream(writer, req):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _json(self, writer, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                     f"\r\n\r\n".encode() + data)
        await writer.drain()

    async def _stream(self, writer, req: dict) -> bool:
        """One SSE answer; returns whether the connection stays open."""
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if self.chunked else "Connection: close\r\n\r\n"
        writer.write(head.encode())

        async def send(obj) -> None:
            event = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(event), event) if self.chunked else event)
            await writer.drain()

        def chunk(delta: dict, finish=None) -> dict:
            return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake-model",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        n = int(req.get("max_tokens", 8))
        await send(chunk({"role": "assistant", "content": ""}))
        await asyncio.sleep(self.first_delay_s)
        sent_tokens, chunks = 0, 0
        while sent_tokens < n:
            if chunks:
                await asyncio.sleep(self.delay_s)
            k = min(self.per_chunk, n - sent_tokens)
            await send(chunk({"content": " tok" * k}))
            sent_tokens += k
            chunks += 1
            if self.fail == "mid" and chunks == 2:
                await send({"error": {"message": "worker died", "type": "server_error", "param": None,
                                      "code": 500}})
                await send(b"[DONE]")
                break
        else:
            await send(chunk({}, "length"))
            if self.usage and (req.get("stream_options") or {}).get("include_usage"):
                await send({**chunk({}), "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                                   "total_tokens": n + 7}})
            await send(b"[DONE]")
        if self.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        return False


def _one(url: str, body: dict, timeout_s: float = 10.0) -> ChatResult:
    async def go() -> ChatResult:
        conn = RawConnection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            return await stream_chat(conn, "/v1/chat/completions", orjson.dumps(body), {}, time.perf_counter(),
                                     timeout_s)
        finally:
            conn.close()

    return asyncio.run(go())


def _body(max_tokens: int = 8) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


# ------------------------------------------------------------------------------------------ client
def test_stream_measures_ttft_gaps_and_usage_tokens_over_chunked_encoding():
    with FakeOpenAI(delay_s=0.02, first_delay_s=0.1) as srv:
        r = _one(srv.url, _body(8))
    assert r.status == 200 and r.saw_done and r.error is None
    assert len(r.chunk_times) == 8 and r.output_tokens == 8 and r.usage_tokens == 8 and r.prompt_tokens == 7
    assert r.finish_reason == "length"
    assert r.ttft_s >= 0.09  # the role-only first chunk does not count as a token
    gaps = r.itls_s
    assert len(gaps) == 7 and all(g >= 0 for g in gaps) and sum(gaps) >= 7 * 0.015
    assert r.e2e_s >= r.ttft_s + sum(gaps) - 1e-6
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 7)
    assert r.max_itl_s == max(gaps)


def test_several_tokens_per_chunk_counts_tokens_from_usage_not_chunks():
    with FakeOpenAI(per_chunk=3, delay_s=0.01) as srv:
        r = _one(srv.url, _body(9))
    assert r.status == 200 and len(r.chunk_times) == 3 and r.output_tokens == 9
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 8)


def test_without_a_usage_chunk_tokens_fall_back_to_content_chunks():
    with FakeOpenAI(usage=False, delay_s=0.0) as srv:
        r = _one(srv.url, _body(5))
    assert r.status == 200 and r.usage_tokens is None and r.output_tokens == 5
    assert r.record()["tokens_from"] == "chunks"


def test_close_delimited_stream_and_keep_alive_reuse():
    with FakeOpenAI(chunked=False, delay_s=0.0) as srv:
        r = _one(srv.url, _body(4))
    assert r.status == 200 and r.saw_done and len(r.chunk_times) == 4

    async def twice(url: str) -> list[ChatResult]:  # chunked: the connection is reused for the next
        conn = RawConnection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        out = [await stream_chat(conn, "/v1/chat/completions", orjson.dumps(_body(3)), {}, time.perf_counter(), 5)
               for _ in range(2)]
        conn.close()
        return out

    with FakeOpenAI(delay_s=0.0) as srv:
        results = asyncio.run(twice(srv.url))
    assert [x.status for x in results] == [200, 200] and [x.output_tokens for x in results] == [3, 3]


def test_error_event_mid_stream_is_a_stream_error_with_its_message():
    with FakeOpenAI(fail="mid", delay_s=0.0) as srv:
        r = _one(srv.url, _body(8))
    assert r.status == "stream_error" and r.error == "worker died" and not r.ok
    assert len(r.chunk_times) == 2
    assert not meets_slo(r, Slo())


def test_503_before_the_stream_keeps_the_status_and_message():
    with FakeOpenAI(fail="503") as srv:
        r = _one(srv.url, _body(8))
    assert r.status == 503 and r.error == "server overloaded" and r.ttft_s is None and not r.ok


def test_timeout_and_refused_connection():
    from framework.bench.baselines import free_port

    with FakeOpenAI(delay_s=0.5) as srv:
        r = _one(srv.url, _body(8), timeout_s=0.3)
    assert r.status == "timeout"
    assert _one(f"http://127.0.0.1:{free_port()}", _body(2)).status == "connect_error"


def test_sse_reader_handles_split_events_crlf_comments_and_a_missing_done():
    r = ChatResult(intended=0.0, sent=0.0)
    sse = SseReader(r)
    content = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r\n\r\n'
    sse.feed(b": keep-alive\n\n" + content[:10], now=1.0)
    sse.feed(content[10:], now=2.0)
    sse.feed(b'data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}\n\n', now=3.0)
    assert r.chunk_times == [2.0, 3.0] and r.finish_reason == "stop" and not r.saw_done
    sse.feed(b"data: [DONE]\n\n", now=4.0)
    assert r.saw_done


# ----------------------------------------------------------------------------------------- goodput
def _result(ttft: float, gaps: list[float], tokens: int | None = None, status: int | str = 200) -> ChatResult:
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    r = ChatResult(intended=0.0, sent=0.0, done=times[-1], status=status, chunk_times=times)
    r.usage_tokens = tokens
    return r


def test_goodput_counts_requests_within_ttft_and_pace():
    slo = Slo(ttft_ms=1000, itl_ms=100, itl_metric="tpot")
    fast = _result(0.5, [0.05] * 9)  # TPOT 50 ms
    slow_start = _result(1.5, [0.05] * 9)
    slow_pace = _result(0.5, [0.2] * 9)  # TPOT 200 ms
    one_stall = _result(0.5, [0.01] * 8 + [0.5])  # TPOT ~62 ms, but one 500 ms gap
    failed = _result(0.1, [0.01], status=503)
    single = _result(0.2, [], tokens=1)  # one token: TTFT alone decides
    rs = [fast, slow_start, slow_pace, one_stall, failed, single]
    assert [meets_slo(r, slo) for r in rs] == [True, False, False, True, False, True]
    assert goodput(rs, 2.0, slo) == pytest.approx(1.5)
    strict = Slo(ttft_ms=1000, itl_ms=100, itl_metric="max_itl")
    assert [meets_slo(r, strict) for r in rs] == [True, False, False, False, False, True]
    assert goodput(rs, 0.0, slo) == 0.0
    # chunks of several tokens: TPOT uses the usage count, so 4 chunks 300 ms apart carrying 40 tokens pass
    assert meets_slo(_result(0.2, [0.3] * 3, tokens=40), slo)


# ---------------------------------------------------------------------------------------- workload
def test_chat_workload_is_seeded_and_follows_the_distributions():
    a = chat_workload(50, {"dist": "uniform", "min": 10, "max": 20}, {"dist": "fixed", "mean": 16}, model="m", seed=3)
    b = chat_workload(50, {"dist": "uniform", "min": 10, "max": 20}, {"dist": "fixed", "mean": 16}, model="m", seed=3)
    assert [r.body for r in a.requests] == [r.body for r in b.requests]
    bodies = [orjson.loads(r.body) for r in a.requests]
    assert all(x["stream"] and x["stream_options"] == {"include_usage": True} and x["ignore_eos"] for x in bodies)
    assert all(x["max_tokens"] == 16 and x["model"] == "m" and x["temperature"] == 0 for x in bodies)
    words = [len(x["messages"][0]["content"].split()) for x in bodies]
    assert min(words) >= 10 and max(words) <= 20 and len(set(words)) > 3
    assert len({x["messages"][0]["content"] for x in bodies}) == 50
    assert a.description["kind"] == "chat" and a.description["streaming"] and a.warmup
    import random

    rng = random.Random(0)
    normal = [sample_length({"dist": "normal", "mean": 64, "std": 8, "min": 40, "max": 90}, rng) for _ in range(500)]
    assert 40 <= min(normal) and max(normal) <= 90 and 60 < sum(normal) / 500 < 68
    assert dist_problems({"dist": "poisson"}, "x") and dist_problems({"dist": "uniform", "min": 9, "max": 3}, "x")
    assert not dist_problems({"dist": "fixed", "mean": 64}, "x")
    assert "model" not in orjson.loads(build({"kind": "chat"}, 2).requests[0].body)


def test_jsonl_chat_bodies_are_streamed_and_ask_for_usage(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                "max_tokens": 4}) + "\n")
    wl = load_jsonl(path)
    assert wl.description["streaming"] and orjson.loads(wl.requests[0].body)["stream_options"] == {
        "include_usage": True}
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"input": "x"}\n')
    assert not load_jsonl(plain).description["streaming"]


def test_chat_profile_composes_and_bad_chat_settings_are_listed():
    settings = bench_settings(compose(["bench=chat"], config_name="bench"))
    assert settings.path == "/v1/chat/completions" and settings.workload.kind == "chat"
    assert settings.baselines == [] and settings.slo.ttft_ms == 1000 and settings.slo.itl_ms == 200
    assert settings.rates == [0.25, 0.5, 1] and settings.workload.output_tokens["mean"] == 64
    with pytest.raises(ConfigError) as err:
        bench_settings({"workload": {"kind": "chat", "output_tokens": {"dist": "uniform", "min": 5}},
                        "baselines": ["fastapi_echo"], "slo": {"itl_metric": "p99", "ttft_ms": 0}})
    text = str(err.value)
    for key in ("bench.workload.output_tokens.max", "bench.baselines", "bench.slo.itl_metric", "bench.slo.ttft_ms"):
        assert key in text


# ------------------------------------------------------------------------------------ end to end
def test_run_chat_drives_open_loop_load_and_writes_chat_reports(tmp_path):
    from framework.bench.app import run_chat

    cfg = compose(["bench=chat", "bench.rates=[10,20]", "bench.duration_s=0.5", "bench.warmup_s=0.2",
                   "bench.progress=false", "bench.workload.output_tokens={dist: fixed, mean: 6}",
                   "bench.workload.prompt_tokens={dist: fixed, mean: 8}", "bench.startup_timeout_s=5"],
                  config_name="bench")
    settings = bench_settings(cfg)
    with FakeOpenAI(delay_s=0.01, first_delay_s=0.02) as srv:
        res = run_chat(settings, srv.url, output_dir=tmp_path)
        seen = list(srv.bodies)
    assert res["status"] == "ok", res["error"]
    assert res["workload"]["model"] == "fake-model" and all(b["model"] == "fake-model" for b in seen)
    assert [s["offered_rate"] for s in res["stages"]] == [10, 20]
    for st in res["stages"]:
        c = st["chat"]
        assert st["ok"] == st["sent"] > 0 and not st["errors"]
        assert c["output_tokens"] == 6 * st["ok"] and c["tokens_from"] == {"usage": st["ok"]}
        assert c["ttft_ms"]["p50"] <= c["ttft_ms"]["p99"] <= c["e2e_ms"]["p99"]
        assert c["itl_ms"]["p50"] is not None and c["tpot_ms"]["p50"] is not None
        assert c["output_tokens_per_s"] > 0 and c["requests_per_s"] > 0
        assert c["goodput"] == st["goodput"] and st["slo_attainment"] == 1.0
        assert c["slo"] == {"ttft_ms": 1000.0, "itl_ms": 200.0, "itl_metric": "tpot"}
        assert len(c["cdf"]["ttft_ms"]) == len(c["cdf"]["percentiles"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["stages"][0]["chat"]["output_tokens"] == res["stages"][0]["chat"]["output_tokens"]
    md = (tmp_path / "summary.md").read_text()
    assert "streamed chat" in md and "TTFT p50 ms" in md and "TPOT" in md
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == sum(s["ok"] for s in res["stages"]) and rows[0]["output_tokens"] == 6


def test_run_chat_counts_a_server_that_refuses_every_request(tmp_path):
    from framework.bench.app import run_chat

    settings = bench_settings({"path": "/v1/chat/completions", "rates": [20], "duration_s": 0.3, "warmup_s": 0,
                               "progress": False, "startup_timeout_s": 0.5, "baselines": [],
                               "workload": {"kind": "chat", "model": "m",
                                            "output_tokens": {"dist": "fixed", "mean": 4}}})
    with FakeOpenAI(fail="503") as srv:
        res = run_chat(settings, srv.url, output_dir=tmp_path)
    st = res["stages"][0]
    assert st["ok"] == 0 and st["errors"].get("503") == st["sent"] > 0 and st["goodput"] == 0
    assert st["chat"]["error_messages"] == {"503": "server overloaded"}
    assert "server overloaded" in (tmp_path / "summary.md").read_text()


def test_httpx_client_streams_chat_too():
    from framework.bench.app import run_chat

    settings = bench_settings({"path": "/v1/chat/completions", "rates": [10], "duration_s": 0.3, "warmup_s": 0,
                               "progress": False, "client": "httpx", "startup_timeout_s": 2, "baselines": [],
                               "workload": {"kind": "chat", "output_tokens": {"dist": "fixed", "mean": 4}}})
    with FakeOpenAI(delay_s=0.005, per_chunk=2) as srv:
        res = run_chat(settings, srv.url)
    st = res["stages"][0]
    assert res["status"] == "ok" and st["ok"] == st["sent"] > 0
    assert st["chat"]["output_tokens"] == 4 * st["ok"] and st["chat"]["content_chunks"] == 2 * st["ok"]

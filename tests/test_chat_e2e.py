"""Chat serving end to end: a real server with a tiny random Llama on loopback, the official ``openai``
client (sync and async, streaming and not), raw SSE framing, stop strings, usage, cancellation on
disconnect, 503 beyond the KV budget, 504 deadlines, the generation metrics and the request's trace.

No timing assertions: speed lives in benchmarks/generation.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework import traces_view

MESSAGES = [{"role": "user", "content": "what is the capital of france?"}]


@pytest.fixture(scope="module")
def chat(serve_module, tiny_chat_dir):
    # model=hf_causal_lm picks batching=continuous itself (conf/model/hf_causal_lm.yaml).
    return serve_module(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
                         "batching.max_num_seqs=4",
                         "batching.max_model_len=16384", "cache=none", "tracing=file"])


@pytest.fixture(scope="module")
def one_slot(serve_module, tiny_chat_dir):
    """One KV slot and a queue of one: the second request waits, the third is refused."""
    return serve_module(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
                         "batching.max_num_seqs=1",
                         "batching.max_num_batched_tokens=64", "batching.max_waiting=1",
                         "batching.max_model_len=16384", "cache=none", "tracing=none"])


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def greedy(server, messages=MESSAGES, **kw):
    kw.setdefault("temperature", 0)
    return client(server).chat.completions.create(model="tiny_chat", messages=messages, **kw)


def metric_samples(server) -> dict:
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0) + s.value
    return out


def sse_events(raw: bytes) -> list[bytes]:
    """The data payloads of a server-sent-events body, checking its framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: "):] for e in events]


# --- the OpenAI API, through the official client -------------------------------------------------------
def test_models_lists_the_served_model(chat):
    models = client(chat).models.list()
    assert [m.id for m in models.data] == ["tiny_chat"]


def test_chat_completion_has_text_finish_reason_and_usage(chat, tiny_chat_dir):
    from transformers import AutoTokenizer

    answer = greedy(chat, max_tokens=8)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    prompt_ids = AutoTokenizer.from_pretrained(str(tiny_chat_dir)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == len(prompt_ids) + 8
    assert answer.model == "tiny_chat" and answer.id.startswith("chatcmpl-")
    # max_completion_tokens is the newer name of the same limit.
    again = greedy(chat, max_completion_tokens=8)
    assert again.choices[0].message.content == choice.message.content  # greedy: the same answer


def test_streamed_chat_equals_the_plain_answer(chat):
    plain = greedy(chat, max_tokens=12).choices[0].message.content
    stream = greedy(chat, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_sse_framing_ends_with_done(chat):
    body = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True}
    r = httpx.post(chat.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1  # one id for the whole answer
    assert not any("usage" in c for c in chunks)  # usage only when include_usage asks for it


def test_completions_plain_and_streamed(chat):
    c = client(chat)
    plain = c.completions.create(model="tiny_chat", prompt="the quick brown", max_tokens=10, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 10
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny_chat", prompt="the quick brown", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == plain.choices[0].text


def test_stop_string_ends_the_answer_and_is_never_sent(chat):
    full = greedy(chat, max_tokens=24).choices[0].message.content
    visible = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd"]
    assert len(visible) >= 6, f"the tiny model's answer is too short to cut: {full!r}"
    start = visible[len(visible) // 2]
    stop = full[start:start + 2]
    expected = full[:full.index(stop)]
    cut = greedy(chat, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(chat, max_tokens=24, stop=stop, stream=True)
                       if c.choices)
    assert streamed == expected and stop not in streamed


def test_seeded_sampling_is_reproducible(chat):
    def sample():
        return client(chat).chat.completions.create(model="tiny_chat", messages=MESSAGES, temperature=1.0,
                                                     top_p=0.9, seed=1234, max_tokens=12).choices[0].message.content

    assert sample() == sample()


def test_async_client_concurrent_streams_each_get_their_own_answer(chat):
    prompts = [f"hello world {i}" for i in range(6)]
    expected = [greedy(chat, messages=[{"role": "user", "content": p}], max_tokens=10).choices[0].message.content
                for p in prompts]

    async def one(c: openai.AsyncOpenAI, p: str) -> str:
        stream = await c.chat.completions.create(model="tiny_chat", messages=[{"role": "user", "content": p}],
                                                 temperature=0, max_tokens=10, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=chat.url + "/v1", api_key="unused", max_retries=0) as c:
            plain = await c.chat.completions.create(model="tiny_chat", messages=MESSAGES, temperature=0,
                                                    max_tokens=4)
            assert plain.usage.completion_tokens == 4
            return await asyncio.gather(*(one(c, p) for p in prompts))

    # More streams than KV slots (4): the rest wait for a slot and join the running batch.
    assert asyncio.run(main()) == expected


# --- errors: OpenAI's error object, status codes ---------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"temperature": 3}, "temperature"),
    ({"logprobs": True}, "logprobs"),
])
def test_unsupported_fields_get_400_naming_the_field(chat, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        greedy(chat, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_too_long_is_400(chat):
    with pytest.raises(openai.NotFoundError) as info:
        client(chat).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        greedy(chat, max_tokens=20000)
    assert "max_model_len=16384" in info.value.message


def test_malformed_body_and_wrong_route_use_the_error_object(chat):
    r = httpx.post(chat.url + "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(chat.url + "/v1/embeddings", json={"input": "x"})  # a chat model serves no embeddings
    assert r.status_code == 404 and "error" in r.json() and r.json()["error"]["type"] == "not_found_error"


# --- cancellation, admission, deadlines ------------------------------------------------------------------
def test_disconnect_cancels_the_sequence(chat):
    before = metric_samples(chat)["hydraserve_generation_tokens_total"]
    body = {"messages": MESSAGES, "max_tokens": 16000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", chat.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # The connection is closed: the worker stops the sequence at its next step.
    time.sleep(1.0)
    first = metric_samples(chat)
    time.sleep(1.0)
    second = metric_samples(chat)
    assert second["hydraserve_generation_tokens_total"] == first["hydraserve_generation_tokens_total"]
    assert first["hydraserve_generation_tokens_total"] - before < 16000  # it never ran to the end
    assert second["hydraserve_num_requests_running"] == 0


def test_disconnect_cancels_a_plain_answer_too(chat):
    body = {"messages": MESSAGES, "max_tokens": 16000, "temperature": 0, "ignore_eos": True}
    before = metric_samples(chat)["hydraserve_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(chat.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    time.sleep(1.0)
    first = metric_samples(chat)
    time.sleep(1.0)
    second = metric_samples(chat)
    assert second["hydraserve_generation_tokens_total"] == first["hydraserve_generation_tokens_total"]
    assert first["hydraserve_generation_tokens_total"] - before < 16000
    assert second["hydraserve_num_requests_running"] == 0


def _long_stream(server, timeout_ms: int | None = None):
    headers = {"X-Request-Timeout-Ms": str(timeout_ms)} if timeout_ms else {}
    body = {"messages": MESSAGES, "max_tokens": 16000, "temperature": 0, "stream": True, "ignore_eos": True}
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_beyond_the_kv_budget_requests_wait_then_get_503(one_slot):
    url = one_slot.url + "/v1/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with _long_stream(one_slot) as running:  # holds the only KV slot
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            waiting = pool.submit(httpx.post, url, json=body, timeout=60)
            time.sleep(0.5)  # it holds the one place in the queue now
            refused = httpx.post(url, json=body, timeout=60)
        # The running stream's client went away: its slot goes to the waiting request.
        assert waiting.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_its_first_token_leaks_nothing(one_slot, stream):
    """The client gives up while its request waits for the only KV slot; when the slot frees, its
    sequence must be dropped, not generated, and its admission place and in-flight count returned."""
    body = {"messages": MESSAGES, "max_tokens": 16000, "temperature": 0, "ignore_eos": True, "stream": stream}
    with _long_stream(one_slot) as running:  # holds the only KV slot
        lines = running.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue: no first token within 0.3 s
            httpx.post(one_slot.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    # The running stream's client left too: the slot frees, the abandoned request gets it, and is dropped.
    time.sleep(1.5)
    first = metric_samples(one_slot)
    time.sleep(1.0)
    second = metric_samples(one_slot)
    assert second["hydraserve_generation_tokens_total"] == first["hydraserve_generation_tokens_total"]
    assert second["hydraserve_num_requests_running"] == 0 and second["hydraserve_num_requests_waiting"] == 0
    assert second["hydraserve_requests_in_flight"] == 0
    # Its place in the queue came back: a new request is served.
    assert httpx.post(one_slot.url + "/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False},
                      timeout=60).status_code == 200


def test_deadline_before_the_first_token_is_504(one_slot):
    with _long_stream(one_slot) as running:  # holds the only KV slot
        lines = running.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        with pytest.raises(openai.APIStatusError) as info:
            client(one_slot).chat.completions.create(
                model="tiny_chat", messages=MESSAGES, max_tokens=4, extra_headers={"X-Request-Timeout-Ms": "300"})
    assert info.value.status_code == 504 and info.value.body["type"] == "timeout"


def test_deadline_after_the_first_token_ends_the_stream_with_an_error_event(one_slot):
    with _long_stream(one_slot, timeout_ms=400) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_bytes())
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "timeout" and "deadline" in error["message"]
    assert len(events) > 3  # tokens came first


# --- metrics and the trace --------------------------------------------------------------------------------
def test_generation_metrics_are_present_and_move(chat):
    before = metric_samples(chat)
    list(greedy(chat, max_tokens=6, stream=True))
    after = metric_samples(chat)
    for name in ("hydraserve_time_to_first_token_seconds_count", "hydraserve_e2e_request_latency_seconds_count",
                 "hydraserve_request_queue_time_seconds_count", "hydraserve_request_prompt_tokens_count",
                 "hydraserve_request_generation_tokens_count"):
        assert after[name] == before.get(name, 0) + 1, name
    assert after["hydraserve_inter_token_latency_seconds_count"] > before.get(
        "hydraserve_inter_token_latency_seconds_count", 0)
    assert after["hydraserve_request_generation_tokens_sum"] - before["hydraserve_request_generation_tokens_sum"] == 6
    assert after["hydraserve_prompt_tokens_total"] > before["hydraserve_prompt_tokens_total"]
    assert {"hydraserve_num_requests_running", "hydraserve_num_requests_waiting",
            "hydraserve_kv_cache_usage_perc"} <= set(after)


def test_one_trace_with_genai_attributes_and_prefill_and_decode_spans(chat):
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    answer = client(chat).chat.completions.with_raw_response.create(
        model="tiny_chat", messages=MESSAGES, temperature=0, max_tokens=7, stream=True,
        extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert answer.headers["traceparent"].split("-")[1] == trace_id
    list(answer.parse())
    spans: dict = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not {"POST /v1/chat/completions", "gen_ai.decode"} <= set(spans):
        time.sleep(0.3)
        spans = {}
        for path in Path(chat.output_dir).rglob("traces.jsonl"):
            spans.update({s["name"]: s for s in traces_view.load_spans(path) if s["trace_id"] == trace_id})
    server = spans["POST /v1/chat/completions"]
    attrs = server["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "tiny_chat"
    assert attrs["gen_ai.usage.output_tokens"] == 7 and attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["http.response.status_code"] == 200
    for name in ("queue.wait", "gen_ai.prefill", "gen_ai.decode"):
        assert spans[name]["parent_span_id"] == server["span_id"], name
    assert spans["gen_ai.prefill"]["end_ns"] <= spans["gen_ai.decode"]["start_ns"] + 1
    assert spans["gen_ai.decode"]["end_ns"] <= server["end_ns"]
    assert spans["gen_ai.decode"]["attributes"]["gen_ai.usage.output_tokens"] == 7


# --- hydraserve bench against the real server -------------------------------------------------------------
def test_bench_chat_measures_the_real_server(chat, tmp_path):
    from framework.bench.app import run_chat
    from framework.bench.config import bench_settings
    from framework.config import compose

    settings = bench_settings(compose(["bench=chat", "bench.rates=[4]", "bench.duration_s=1", "bench.warmup_s=0",
                                       "bench.progress=false", "bench.workload.output_tokens={dist: fixed, mean: 8}",
                                       "bench.workload.prompt_tokens={dist: fixed, mean: 12}"], config_name="bench"))
    res = run_chat(settings, chat.url, output_dir=tmp_path)
    assert res["status"] == "ok", res["error"]
    assert res["workload"]["model"] == "tiny_chat"
    stage = res["stages"][0]
    assert stage["ok"] == stage["sent"] > 0 and not stage["errors"]
    assert stage["chat"]["output_tokens"] == 8 * stage["ok"]  # ignore_eos: exactly what was asked, per usage
    assert stage["chat"]["ttft_ms"]["p50"] is not None and stage["chat"]["itl_ms"]["p50"] is not None
    assert (tmp_path / "latency.png").exists()


# --- the response cache: deterministic answers only ----------------------------------------------------
@pytest.fixture(scope="module")
def cached_chat(serve_module, tiny_chat_dir):
    return serve_module(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
                         "cache=memory", "tracing=none"])


def test_a_deterministic_answer_is_cached_and_a_streamed_hit_replays(cached_chat):
    body = {"messages": [{"role": "user", "content": "hello world, cache me"}], "max_tokens": 9, "temperature": 0}
    url = cached_chat.url + "/v1/chat/completions"
    first = httpx.post(url, json=body, timeout=60)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    tokens_before = metric_samples(cached_chat)["hydraserve_generation_tokens_total"]
    second = httpx.post(url, json=body, timeout=60)
    assert second.headers["x-cache"] == "hit"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert second.json()["usage"] == first.json()["usage"]
    # A streamed request for the same answer is the same entry, replayed as server-sent events.
    stream = client(cached_chat).chat.completions.with_raw_response.create(
        model="tiny_chat", messages=body["messages"], max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True})
    assert stream.headers["x-cache"] == "hit"
    chunks = list(stream.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        first.json()["choices"][0]["message"]["content"]
    assert chunks[-1].usage.completion_tokens == 9
    assert metric_samples(cached_chat)["hydraserve_generation_tokens_total"] == tokens_before  # never computed
    # Another sampling parameter is another answer; a sampled request is never cached.
    assert httpx.post(url, json={**body, "max_tokens": 8}, timeout=60).headers["x-cache"] == "miss"
    sampled = {**body, "temperature": 1.0}
    assert httpx.post(url, json=sampled, timeout=60).headers["x-cache"] == "bypass"
    assert httpx.post(url, json=sampled, timeout=60).headers["x-cache"] == "bypass"
    # A seeded request is deterministic: cached.
    seeded = {**body, "temperature": 1.0, "seed": 7}
    assert httpx.post(url, json=seeded, timeout=60).headers["x-cache"] == "miss"
    assert httpx.post(url, json=seeded, timeout=60).headers["x-cache"] == "hit"

"""The generation levers through a real server: the prefix cache and n-gram speculation over HTTP.

Two servers of the tiny random chat model on loopback, one with the levers (the prefix cache as
shipped, ``batching.speculative=ngram``) and one without (``batching.prefix_cache_mb=0``): the same
greedy answers from both, the levers' metrics moving on the first, ``prefix_cache.hit_tokens`` on
its prefill span, and bad lever settings refused before any process starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from test_chat_e2e import metric_samples
from test_cli import hydraserve

from framework import traces_view

SYSTEM = ("You are the assistant of a lighthouse museum. The lighthouse at Skerry Point was built in 1874 on "
          "a ledge of black basalt, a mile from the nearest village. For sixty years its lamp burned colza "
          "oil, then paraffin, and each keeper climbed the one hundred and twelve steps four times a night.")
QUESTIONS = ["when was it built?", "what did the lamp burn?", "how many steps are there?"]


def common(tiny_chat_dir) -> list[str]:
    return ["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
            "batching.max_num_seqs=2", "batching.max_model_len=1024", "cache=none"]


@pytest.fixture(scope="module")
def with_levers(serve_module, tiny_chat_dir):
    return serve_module([*common(tiny_chat_dir), "batching.speculative=ngram", "tracing=file"])


@pytest.fixture(scope="module")
def without_levers(serve_module, tiny_chat_dir):
    return serve_module([*common(tiny_chat_dir), "batching.prefix_cache_mb=0", "tracing=none"])


def ask(server, question: str, stream: bool = False, **kw) -> str:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if stream:
        parts = c.chat.completions.create(model="tiny_chat", messages=messages, temperature=0, max_tokens=24,
                                          stream=True, **kw)
        return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    answer = c.chat.completions.create(model="tiny_chat", messages=messages, temperature=0, max_tokens=24, **kw)
    return answer.choices[0].message.content


def test_answers_are_the_same_with_and_without_the_levers(with_levers, without_levers):
    before = metric_samples(with_levers)
    got = [ask(with_levers, q, stream=i == 1) for i, q in enumerate(QUESTIONS)]
    expected = [ask(without_levers, q) for q in QUESTIONS]
    assert got == expected
    after = metric_samples(with_levers)
    # The shared system prompt is computed once: the later questions find its blocks.
    assert after["hydraserve_prefix_cache_hits_total"] - before.get("hydraserve_prefix_cache_hits_total", 0) >= 2 * 48
    assert after["hydraserve_prefix_cache_queries_total"] > before.get("hydraserve_prefix_cache_queries_total", 0)
    assert after["hydraserve_prefix_cache_blocks"] > 0
    assert after["hydraserve_spec_decode_num_drafts_total"] > before.get("hydraserve_spec_decode_num_drafts_total", 0)
    off = metric_samples(without_levers)
    assert off.get("hydraserve_prefix_cache_hits_total", 0) == 0


def test_the_prefill_span_says_how_many_tokens_came_from_the_cache(with_levers):
    trace_id = "6cf92f3577b34da6a3ce929d0e0e4737"
    ask(with_levers, QUESTIONS[0])  # the system prompt is cached (whichever test ran first)
    ask(with_levers, "and who was the last keeper?",
        extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "Cache-Control": "no-cache"})
    prefill = None
    deadline = time.monotonic() + 15
    while prefill is None and time.monotonic() < deadline:
        time.sleep(0.3)
        for path in Path(with_levers.output_dir).rglob("traces.jsonl"):
            for span in traces_view.load_spans(path):
                if span["trace_id"] == trace_id and span["name"] == "gen_ai.prefill":
                    prefill = span
    assert prefill is not None
    attrs = prefill["attributes"]
    assert attrs["prefix_cache.hit_tokens"] >= 48  # the system prompt's whole 16-token blocks
    assert attrs["prefix_cache.hit_tokens"] < attrs["gen_ai.usage.input_tokens"]


def test_bad_lever_settings_are_refused_before_start(tiny_chat_dir):
    result = hydraserve("validate", *common(tiny_chat_dir), "batching.speculative=eagle",
                        "batching.prefix_cache_mb=-1", "batching.prompt_lookup_min=5")
    assert result.returncode == 2, result.stdout
    for named in ("batching.speculative: must be one of off, ngram",
                  "batching.prefix_cache_mb: must be >= 0 (0 turns the prefix cache off)",
                  "batching.prompt_lookup_max: must be >= prompt_lookup_min (5)"):
        assert named in result.stderr, result.stderr


@pytest.mark.parametrize("preset, max_num_seqs", [("chat_low_latency", 4), ("chat_throughput", 16)])
def test_the_chat_presets_serve_another_chat_model_with_the_same_answers(preset, max_num_seqs, serve,
                                                                         tiny_chat_dir, without_levers):
    # The preset names SmolLM2; model=... on the command line swaps in any chat model and keeps the rest.
    server = serve([f"experiment={preset}", "model=hf_causal_lm", f"model.path={tiny_chat_dir}",
                    "model.served_name=tiny_chat", "batching.max_model_len=1024", "cache=none", "tracing=none"])
    config = httpx.get(server.url + "/info", timeout=10).json()["config"]
    assert config["model"]["name"] == "hf_causal_lm" and config["hardware"]["spin_wait"] is True
    assert (config["batching"]["max_num_seqs"], config["batching"]["max_num_batched_tokens"]) == (max_num_seqs, 64)
    # 64-token prefill chunks and spinning threads change the pace, never a greedy answer
    assert [ask(server, q, stream=True) for q in QUESTIONS] == [ask(without_levers, q) for q in QUESTIONS]

"""The generation engine (framework/generation) with the batched Llama forward, on a tiny random model.

Greedy outputs must equal transformers' ``generate`` run one prompt at a time, whatever joins, leaves
or is chunked around them. The model runs in float64 so that batching's reordered sums can never flip
an argmax between near-tied logits: the comparison is of the algorithm, not of rounding.
"""

from __future__ import annotations

import pytest
from tiny_llama import greedy, make_engine, prompts, reference, run

from framework.generation import (
    EngineConfig,
    GenerationEngine,
    GenerationRequest,
    QueueFullError,
    RequestTooLongError,
    SamplingParams,
)
from framework.generation.text import IncrementalDetokenizer, StopMatcher
from plugins.model._llama_batched import LlamaBatchedForward


def test_concurrent_greedy_equals_sequential_generate_with_joins_and_chunking(model, tokenizer):
    ps = prompts(6)
    lengths = [12, 9, 15, 6, 11, 14]
    expected = [reference(model, p, n) for p, n in zip(ps, lengths, strict=True)]
    # 3 slots for 6 requests (some wait), a 16-token budget (the 20- and 33-token prompts are chunked),
    # and requests joining at steps 0, 3 and 7 while others decode.
    engine = make_engine(model, tokenizer, max_num_seqs=3, max_num_batched_tokens=16)
    joins = {0: [greedy(ps[0], lengths[0]), greedy(ps[1], lengths[1])],
             3: [greedy(ps[2], lengths[2]), greedy(ps[3], lengths[3])],
             7: [greedy(ps[4], lengths[4]), greedy(ps[5], lengths[5])]}
    ids, _, reasons = run(engine, joins)
    assert [ids[i] for i in range(6)] == expected
    assert all(reasons[i] == "length" for i in range(6))
    assert engine.num_running == 0 and engine.kv_usage() == 0.0


def test_chunked_prefill_gives_the_same_output(model, tokenizer):
    prompt = prompts(5)[4]  # 33 tokens
    whole, _, _ = run(make_engine(model, tokenizer, max_num_batched_tokens=64), {0: [greedy(prompt, 8)]})
    chunked, _, _ = run(make_engine(model, tokenizer, max_num_batched_tokens=5), {0: [greedy(prompt, 8)]})
    assert chunked[0] == whole[0] == reference(model, prompt, 8)


def test_cancelled_sequence_computes_no_more_tokens(model, tokenizer):
    engine = make_engine(model, tokenizer)
    a = engine.add(greedy(prompts(1)[0], 50))
    b = engine.add(greedy(prompts(2)[1], 50))
    for _ in range(4):
        engine.step()
    seq_a = engine.sequence(a)
    before = seq_a.computed_tokens
    assert engine.cancel(a) and engine.num_running == 1  # its slot is free before the next step
    outs = engine.step()
    assert [(o.seq_id, o.finished, o.finish_reason) for o in outs if o.seq_id == a] == [(a, True, "cancelled")]
    for _ in range(3):
        engine.step()
    assert seq_a.computed_tokens == before
    assert engine.sequence(b).computed_tokens > 0 and not engine.cancel(a)
    # A waiting request can be cancelled too, and never computes anything.
    engine2 = make_engine(model, tokenizer, max_num_seqs=1, max_num_batched_tokens=8)
    engine2.add(greedy(prompts(1)[0], 5))
    w = engine2.add(greedy(prompts(1)[0], 5))
    engine2.step()
    seq_w = engine2.sequence(w)
    assert engine2.cancel(w)
    run(engine2)
    assert seq_w.computed_tokens == 0


def test_stop_string_across_tokens_is_never_emitted(model, tokenizer):
    prompt = prompts(1)[0]
    full_ids, full_text, _ = run(make_engine(model, tokenizer), {0: [greedy(prompt, 30)]})
    text = full_text[0]
    assert text == tokenizer.decode(full_ids[0])  # incremental text == one decode of all ids
    # A stop string that starts inside one token's text and ends in a later one.
    pieces = [tokenizer.decode(full_ids[0][:i]) for i in range(len(full_ids[0]) + 1)]
    cut = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i]) > 6)
    start = len(pieces[cut - 1]) - 1
    stop = text[start:start + 3]
    first = text.find(stop)
    ids, out, reasons = run(make_engine(model, tokenizer), {0: [greedy(prompt, 30, stop=[stop])]})
    assert out[0] == text[:first] and reasons[0] == "stop"
    assert stop not in out[0]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x E") == ("ENx ", False)
    assert m.feed("ND tail") == ("", True)
    m = StopMatcher(["stop"])
    assert m.feed("no st") == ("no ", False)
    assert m.flush() == "st"


def test_detokenizer_never_emits_half_characters(tokenizer):
    ids = tokenizer.encode("emoji 🙂 日本語 café")
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == "emoji 🙂 日本語 café"
    assert not any("\ufffd" in p for p in pieces)


def test_eos_ends_with_stop_and_is_not_emitted(model, tokenizer):
    prompt = prompts(1)[0]
    ids, _, _ = run(make_engine(model, tokenizer), {0: [greedy(prompt, 10)]})
    fifth = ids[0][4]  # pretend the 5th generated token is the EOS
    engine = GenerationEngine(LlamaBatchedForward(model, 4, 128), tokenizer,
                              EngineConfig(max_num_seqs=4, max_model_len=128), eos_token_ids=[fifth])
    got, text, reasons = run(engine, {0: [GenerationRequest(prompt_ids=prompt, max_tokens=10)]})
    first = ids[0].index(fifth)
    assert got[0] == ids[0][:first + 1] and reasons[0] == "stop"
    assert text[0] == tokenizer.decode(ids[0][:first])


def test_seeded_sampling_is_reproducible_in_any_batch(model, tokenizer):
    p = prompts(3)
    req = GenerationRequest(prompt_ids=p[0], max_tokens=12, ignore_eos=True,
                            sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    alone, _, _ = run(make_engine(model, tokenizer), {0: [req]})
    crowd, _, _ = run(make_engine(model, tokenizer), {0: [greedy(p[1], 12), req, greedy(p[2], 5)]})
    assert alone[0] == crowd[1]


def test_requests_that_cannot_fit_are_rejected(model, tokenizer):
    engine = make_engine(model, tokenizer, max_model_len=32, max_waiting=1)
    with pytest.raises(RequestTooLongError, match="max_model_len=32"):
        engine.add(greedy(list(range(1, 30)), 4))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add(greedy([1, 2], 0))
    with pytest.raises(ValueError, match="temperature"):
        engine.add(GenerationRequest(prompt_ids=[1], sampling=SamplingParams(temperature=-1)))
    engine.add(greedy([1, 2], 4))
    with pytest.raises(QueueFullError, match="max_waiting=1"):
        engine.add(greedy([1, 2], 4))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="KV slots"):
        GenerationEngine(LlamaBatchedForward(model, 2, 64), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64))

"""The generation engine's latency levers on a tiny model: the prefix cache and n-gram speculation.

Each lever must leave greedy output exactly as it was (checked against transformers' ``generate`` and
against the engine without the lever), and do less work: fewer prompt tokens computed, fewer forwards.
The models run in float64, as in test_generation_engine.py, so a reordered sum never flips an argmax.
"""

from __future__ import annotations

import pytest
import torch
from tiny_llama import build_model, greedy, make_engine, prompts, reference, run

from framework.generation import EngineConfig, GenerationEngine, GenerationRequest, SamplingParams
from framework.generation.prefix_cache import PrefixCache
from framework.generation.speculative import NgramConfig, propose
from plugins.model._llama_batched import LlamaBatchedForward

CYCLE = 7  # the cycling model's next token is a fixed function of the current one, in cycles of 7


@pytest.fixture(scope="module")
def cycling_model(tokenizer):
    """A Llama whose next token depends only on the current token (attention and MLP outputs zeroed,
    the lm_head a permutation of the embeddings), so its greedy answers repeat themselves: what an
    answer quoting its input looks like to the n-gram drafter. Attention still reads and writes KV."""
    m = build_model(tokenizer)
    vocab = m.config.vocab_size
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.randn(vocab, m.config.hidden_size, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64) * 4
        m.model.embed_tokens.weight.copy_(emb)
        nxt = [(t // CYCLE) * CYCLE + (t % CYCLE + 1) % CYCLE for t in range(vocab)]
        nxt = [n if n < vocab else t for t, n in enumerate(nxt)]
        head = torch.zeros_like(m.lm_head.weight)
        for t, n in enumerate(nxt):
            head[n] += emb[t]  # logit of n is largest when the current token is t
        m.lm_head.weight = torch.nn.Parameter(head)
    return m


class Steps:
    """Counts the model forwards an engine runs."""

    def __init__(self, engine: GenerationEngine):
        self.n = 0
        forward = engine.model.forward_step

        def counted(*args, **kw):
            self.n += 1
            return forward(*args, **kw)

        engine.model.forward_step = counted


# --- prefix cache ------------------------------------------------------------------------------------
def test_shared_prefix_is_not_recomputed_and_output_is_unchanged(model, tokenizer):
    shared = prompts(5)[4] + prompts(5)[3]  # 33 + 20 tokens, e.g. a system prompt
    first, second = shared + [5, 6, 7], shared + [9, 10, 11, 12]
    engine = make_engine(model, tokenizer, prefix_cache_mb=4, prefix_block_size=8)
    ids, _, _ = run(engine, {0: [greedy(first, 8)]})
    computed_first = engine.prefill_tokens
    ids2, _, _ = run(engine, {0: [greedy(second, 8)]})
    assert ids[0] == reference(model, first, 8)
    assert ids2[1] == reference(model, second, 8)
    hit = (len(shared) // 8) * 8  # whole blocks of the shared 53 tokens: 48
    assert engine.prefix.hit_tokens == hit
    assert engine.prefill_tokens - computed_first == len(second) - hit
    seq_first_prefill = engine.prefill_tokens  # nothing else ran
    assert seq_first_prefill == len(first) + len(second) - hit


def test_a_conversations_next_turn_reuses_the_previous_answer(model, tokenizer):
    prompt = prompts(5)[4]
    engine = make_engine(model, tokenizer, prefix_cache_mb=4, prefix_block_size=4)
    ids, _, _ = run(engine, {0: [greedy(prompt, 16)]})
    answer = ids[0]
    follow_up = prompt + answer + [7, 8, 9]
    ids2, _, _ = run(engine, {0: [greedy(follow_up, 6)]})
    assert ids2[1] == reference(model, follow_up, 6)
    # The answer's KV was kept when the first request finished: all but its last token are cached
    # (the last sampled token was never run through the model).
    cached = len(prompt) + len(answer) - 1
    assert engine.prefix.hit_tokens == (cached // 4) * 4


def test_prefix_cache_is_bounded_and_evicts_least_recently_used(model, tokenizer):
    block_bytes = 2 * 2 * 2 * 4 * 16 * 8  # K+V, 2 layers, 2 kv heads, 4 tokens, head_dim 16, float64
    engine = make_engine(model, tokenizer, prefix_cache_mb=1, prefix_block_size=4)
    engine.prefix.max_bytes = 6 * block_bytes  # six blocks (MiB is the config's unit; a test wants few)
    ps = prompts(4, lengths=(12, 13, 14, 15))
    outs = []
    for p in ps:
        ids, _, _ = run(engine, {0: [greedy(p, 4)]})
        outs.append(ids)
    assert engine.prefix.max_blocks == 6
    assert engine.prefix.num_blocks <= 6
    assert engine.prefix.evicted_blocks > 0
    # The newest prompt's blocks are the ones kept: it hits again, the oldest does not.
    last = ps[-1] + [1]
    before = engine.prefix.hit_tokens
    ids, _, _ = run(engine, {0: [greedy(last, 4)]})
    assert engine.prefix.hit_tokens - before == 12
    assert list(ids.values())[0] == reference(model, last, 4)


class _FakeKV:
    def __init__(self):
        self.slots: dict[int, torch.Tensor] = {}

    def read_kv(self, slot, start, end):
        return self.slots[slot][start:end].clone()

    def write_kv(self, slot, start, kv):
        self.slots[slot][start:start + kv.shape[0]] = kv


def test_eviction_takes_leaves_never_a_block_others_continue():
    kv = _FakeKV()
    kv.slots = {0: torch.arange(8.0), 1: torch.arange(8.0)}
    cache = PrefixCache(kv, block_size=2, max_bytes=3 * 2 * 4)  # three float32 blocks of two tokens
    cache.store([1, 2, 3, 4, 5, 6], slot=0, num_cached=6)  # one chain: A -> B -> C
    assert cache.num_blocks == 3
    cache.store([9, 9], slot=1, num_cached=2)  # a new first block: only C (the leaf) may go
    assert cache.evicted_blocks == 1
    kv.slots[2] = torch.zeros(8)
    assert cache.load([1, 2, 3, 4, 5, 6, 0], slot=2, limit=6) == 4  # A and B are still there
    assert cache.load([9, 9, 0], slot=2, limit=2) == 2


def test_prefix_cache_settings_are_refused_before_start(model, tokenizer):
    problems = dict(EngineConfig(prefix_cache_mb=-1, prefix_block_size=0).problems())
    assert "0 turns the prefix cache off" in problems["prefix_cache_mb"]
    assert "prefix_block_size" in problems

    class NoKVCopies:
        max_num_seqs, max_model_len = 4, 64

        def forward_step(self, decode, prefill):
            raise AssertionError

    with pytest.raises(ValueError, match="prefix_cache_mb: .*no read_kv/write_kv.*prefix_cache_mb=0"):
        GenerationEngine(NoKVCopies(), tokenizer, EngineConfig(max_num_seqs=4, max_model_len=64, prefix_cache_mb=8))


# --- speculative decoding ----------------------------------------------------------------------------
def test_ngram_proposer_continues_the_most_recent_match():
    cfg = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2)
    assert propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 2, 3], cfg, 10) == [5, 6, 2]  # the later "2 3" wins
    assert propose([1, 2, 3, 4, 1, 2, 3], cfg, 10) == [4, 1, 2]  # the longest suffix, "1 2 3"
    assert propose([1, 2, 3, 4, 5], cfg, 10) == []
    assert propose([1, 2, 3, 1, 2], cfg, 1) == [3]  # never more than the room left


def test_speculation_keeps_greedy_output_and_saves_forwards(cycling_model, tokenizer):
    ps = prompts(3)
    plain = make_engine(cycling_model, tokenizer, max_model_len=128)
    spec = make_engine(cycling_model, tokenizer, max_model_len=128, speculative="ngram")
    plain_steps, spec_steps = Steps(plain), Steps(spec)
    expected, _, _ = run(plain, {0: [greedy(ps[0], 40)]})
    ids, _, reasons = run(spec, {0: [greedy(ps[0], 40)]})
    assert ids == expected
    assert ids[0] == reference(cycling_model, ps[0], 40)
    assert reasons[0] == "length" and len(ids[0]) == 40  # never past max_tokens
    assert spec.spec_accepted_tokens > 20
    assert spec_steps.n < plain_steps.n / 2


def test_speculation_with_rejected_drafts_leaves_output_unchanged(model, tokenizer):
    """A random model's drafts are mostly wrong: every rejection must leave the KV as it was."""
    ps = prompts(4)
    expected = [reference(model, p, 30) for p in ps]
    engine = make_engine(model, tokenizer, max_model_len=128, speculative="ngram", prompt_lookup_min=1)
    ids, _, _ = run(engine, {0: [greedy(p, 30) for p in ps]})
    assert [ids[i] for i in range(4)] == expected
    assert engine.spec_drafts > 0


def test_seeded_sampling_draws_the_same_tokens_with_speculation(cycling_model, tokenizer):
    prompt = prompts(2)[1]

    def sampled():
        return GenerationRequest(prompt_ids=prompt, max_tokens=30, ignore_eos=True,
                                 sampling=SamplingParams(temperature=0.3, seed=11))

    plain, _, _ = run(make_engine(cycling_model, tokenizer, max_model_len=128), {0: [sampled()]})
    spec = make_engine(cycling_model, tokenizer, max_model_len=128, speculative="ngram")
    ids, _, _ = run(spec, {0: [sampled()]})
    assert ids == plain
    assert spec.spec_accepted_tokens > 0


def test_speculation_pauses_above_its_batch_limit(cycling_model, tokenizer):
    ps = prompts(3)
    engine = make_engine(cycling_model, tokenizer, max_model_len=128, speculative="ngram", speculative_max_batch=2)
    ids, _, _ = run(engine, {0: [greedy(p, 20) for p in ps]})
    assert engine.spec_drafts == 0  # three sequences decode together the whole time
    assert [ids[i] for i in range(3)] == [reference(cycling_model, p, 20) for p in ps]


def test_speculation_and_prefix_cache_together(cycling_model, tokenizer):
    p = prompts(5)[4]
    engine = make_engine(cycling_model, tokenizer, max_model_len=128, speculative="ngram",
                         prefix_cache_mb=4, prefix_block_size=4)
    run(engine, {0: [greedy(p, 24)]})
    ids, _, _ = run(engine, {0: [greedy(p + [3], 24)]})
    assert ids[1] == reference(cycling_model, p + [3], 24)
    assert engine.prefix.hit_tokens > 0 and engine.spec_accepted_tokens > 0


def test_speculation_settings_are_refused_before_start():
    problems = dict(EngineConfig(speculative="eagle").problems())
    assert "off, ngram" in problems["speculative"]
    problems = dict(EngineConfig(speculative="ngram", num_speculative_tokens=0, prompt_lookup_min=3,
                                 prompt_lookup_max=2).problems())
    assert set(problems) >= {"num_speculative_tokens", "prompt_lookup_max"}


def test_the_batched_forward_returns_every_requested_position(model):
    """A chunk's ``num_logits`` last positions: what verifying a draft reads."""
    from framework.generation import PrefillChunk

    fwd = LlamaBatchedForward(model, 2, 64)
    tokens = torch.tensor(prompts(1, lengths=(10,))[0])
    _, logits = fwd.forward_step(None, [PrefillChunk(0, tokens, 0, num_logits=4)])
    full = model(tokens[None]).logits[0, -4:]
    torch.testing.assert_close(logits, full)

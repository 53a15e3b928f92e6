"""The compiled decode step of the batched Llama forward (``compile_mode``, from ``hardware.compile``).

One compiled forward (2 KV slots: batch buckets 1 and 2, one compile each) on the tiny float64 model of
tests/tiny_llama.py: greedy tokens equal the eager forward's and transformers' ``generate``
whatever joins and leaves, and the compiled graph is what ran. A bad ``hardware.compile`` is refused
before start; ``prepare_generation`` hands the hardware's value to the model's ``batched_forward``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_llama import greedy, prompts, reference, run

from framework.config import compose, validate
from framework.errors import ConfigError
from framework.generation import EngineConfig, GenerationEngine
from plugins.model._llama_batched import LlamaBatchedForward, batch_buckets

CFG = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=96)


@pytest.fixture(scope="module")
def compiled(model):
    forward = LlamaBatchedForward(model, CFG.max_num_seqs, CFG.max_model_len, compile_mode="default")
    report = forward.warmup()
    assert report["batch_buckets"] == [1, 2] and report["compile_mode"] == "default"
    return forward


def test_compiled_greedy_equals_eager_across_joins_and_leaves(model, tokenizer, compiled):
    ps = prompts(4, lengths=(5, 20, 9, 3))
    lengths = [14, 6, 10, 8]
    # 2 slots for 4 requests: they wait, join while others decode, leave at different steps; the 20-token
    # prompt is chunked (16-token budget), so mixed steps (eager) and decode-only steps (compiled)
    # alternate, at batch 1 and 2, over length buckets 16 and 32.
    joins = {0: [greedy(ps[0], lengths[0])], 2: [greedy(ps[1], lengths[1]), greedy(ps[2], lengths[2])],
             9: [greedy(ps[3], lengths[3])]}
    eager_ids, _, _ = run(GenerationEngine(LlamaBatchedForward(model, 2, CFG.max_model_len), tokenizer, CFG), joins)
    before = compiled.compiled_steps
    ids, _, reasons = run(GenerationEngine(compiled, tokenizer, CFG), joins)
    assert [ids[i] for i in range(4)] == [eager_ids[i] for i in range(4)]
    assert [ids[i] for i in range(4)] == [reference(model, p, n) for p, n in zip(ps, lengths, strict=True)]
    assert all(reasons[i] == "length" for i in range(4))
    # The compiled graph ran the decode-only steps, and no shape beyond the warmed buckets compiled.
    assert compiled.compiled_steps - before >= 10
    assert compiled._decode_graph is not None and sorted(compiled._ranges) == [16, 32]
    frame_cache = torch._dynamo.eval_frame._debug_get_cache_entry_list(compiled._decode_layer.__func__.__code__)
    assert len(frame_cache) == 2  # one graph per batch bucket, shared by every layer and length


def test_eager_forward_is_the_default_and_compiles_nothing(model):
    forward = LlamaBatchedForward(model, 2, 32)
    assert forward.compile_mode is None and forward._decode_graph is None
    assert forward.warmup() == {"compile_mode": "off", "compile_ms": 0.0, "batch_buckets": []}
    assert forward.k_cache.shape[1] == 2 and forward.k_cache.shape[3] == 32  # no scratch slot / position
    with pytest.raises(ValueError, match="compile_mode must be one of off, auto, default"):
        LlamaBatchedForward(model, 2, 32, compile_mode="fast")


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


def test_a_bad_compile_value_is_refused_before_start():
    with pytest.raises(ConfigError) as info:
        validate(compose(["model=smollm2", "batching=continuous", "hardware=cpu", "hardware.compile=fast"]))
    assert "compile" in str(info.value) and "fast" in str(info.value)


def test_prepare_generation_passes_the_hardware_compile_mode(tiny_chat_dir, monkeypatch):
    from framework.generation_worker import prepare_generation

    resolved = validate(compose(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "batching=continuous",
                                 "hardware=cpu", "hardware.compile=off"]))
    resolved.hardware.config.compile = "max-autotune"  # what the forward is told (not compiled here)
    seen = {}
    original = type(resolved.model).batched_forward

    def spy(self, max_num_seqs, max_model_len, compile_mode="off", packed_weights=False):
        seen.update(compile_mode=compile_mode, packed_weights=packed_weights)
        # eager: this test does not pay for compiling
        return original(self, max_num_seqs, max_model_len, packed_weights=packed_weights)

    monkeypatch.setattr(type(resolved.model), "batched_forward", spy)
    monkeypatch.setattr(type(resolved.hardware), "setup_process", lambda self: None)
    engine, report = prepare_generation(resolved.model, resolved.quantization, resolved.hardware, "cpu",
                                        resolved.batching.engine_config())
    assert seen == {"compile_mode": "max-autotune", "packed_weights": True}  # hardware.packed_weights' default
    assert report["decode_compile"]["compile_mode"] == "off"
    # The eager forward packed the tiny model's float32 Linear layers, and the report says so (/info).
    assert report["packed_weights"] is True and report["packed_linears"] > 0

"""A tiny random Llama and its byte-level BPE tokenizer, and helpers to drive the generation engine.

Shared by the engine's tests (test_generation_engine.py, test_compiled_decode.py, test_generation_levers.py);
the ``tokenizer`` and ``model`` fixtures in conftest.py build these once per test module. The model runs
in float64 so that batching's reordered sums can never flip an argmax between near-tied logits.
"""

from __future__ import annotations

import torch

from framework.generation import EngineConfig, GenerationEngine, GenerationRequest
from plugins.model._llama_batched import LlamaBatchedForward

CORPUS = ["the quick brown fox jumps over the lazy dog", "café crème brûlée", "日本語のテキスト",
          "hello world, hello engine", "emoji 🙂 and ünïcödé"] * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: a generated token may be half of a UTF-8 character, as in real chat models.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def build_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    m = LlamaForCausalLM(cfg).double().eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def reference(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def make_engine(model, tokenizer, **kw) -> GenerationEngine:
    cfg = EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 128, **kw})
    return GenerationEngine(LlamaBatchedForward(model, cfg.max_num_seqs, cfg.max_model_len), tokenizer, cfg)


def prompts(n: int, lengths=(3, 7, 12, 20, 33, 5)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 300, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def run(engine: GenerationEngine, joins: dict[int, list[GenerationRequest]] | None = None,
        limit: int = 500) -> tuple[dict[int, list[int]], dict[int, str], dict[int, str]]:
    """Step until idle, adding ``joins[step]`` before that step. Returns ids, text and finish reason by id."""
    ids: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for step in range(limit):
        for req in (joins or {}).get(step, []):
            engine.add(req)
        if not engine.has_work() and step > max(joins or {0: 0}):
            break
        for out in engine.step():
            ids.setdefault(out.seq_id, []).extend(out.new_token_ids)
            text[out.seq_id] = text.get(out.seq_id, "") + out.text
            if out.finished:
                reasons[out.seq_id] = out.finish_reason
    return ids, text, reasons


def greedy(prompt: list[int], n: int, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=n, ignore_eos=True, **kw)

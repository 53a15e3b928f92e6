"""The generative model plugins (``hf_causal_lm``, ``smollm2``) and ``batching=continuous``.

``hf_causal_lm`` runs a tiny random-weight Llama with a chat template (tests/tiny_chat_model.py): its
prompts tokenize as the template says, and greedy generation through the plugin's batched forward and
``framework.generation.GenerationEngine`` equals transformers' ``generate``. Config mistakes are refused
naming the key and the fix. One test runs the real SmolLM2-135M-Instruct from the packaged GGUF.
"""

from __future__ import annotations

import json

import pytest
import torch

from framework import GenerativeModelPlugin, RequestError
from framework.config import compose, validate
from framework.errors import ConfigError
from framework.generation import EngineConfig, GenerationEngine, GenerationRequest


def _resolved_hf(folder, *extra):
    return validate(compose(["model=hf_causal_lm", f"model.path={folder}", "batching=continuous", *extra]))


@pytest.fixture(scope="module")
def tiny_lm(tiny_chat_dir):
    resolved = _resolved_hf(tiny_chat_dir)
    model = resolved.model
    model.load("cpu")
    return model, resolved


def _generate(model, prompt_ids: list[int], n: int, cfg: EngineConfig, **kw) -> tuple[list[int], str, str]:
    engine = GenerationEngine(model.batched_forward(cfg.max_num_seqs, cfg.max_model_len), model.tokenizer, cfg,
                              eos_token_ids=model.eos_token_ids())
    engine.add(GenerationRequest(prompt_ids=prompt_ids, max_tokens=n, **kw))
    ids, text, reason = [], "", None
    while engine.has_work():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.text
            reason = out.finish_reason if out.finished else reason
    return ids, text, reason


# --- hf_causal_lm on the tiny chat model --------------------------------------------------------------
def test_hf_causal_lm_loads_and_describes_itself(tiny_lm, tiny_chat_dir):
    model, resolved = tiny_lm
    assert isinstance(model, GenerativeModelPlugin)
    assert model.served_name() == tiny_chat_dir.name  # served_name "" -> the folder's name
    assert model.identity() == {"model": tiny_chat_dir.name, "path": str(tiny_chat_dir.resolve()), "dtype": "float32"}
    assert model.module.dtype == torch.float32 and not model.module.training
    # tokenizer EOS (<|im_end|>) first, then generation_config's (<eos>), each once
    tok = model.tokenizer
    assert model.eos_token_ids() == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<eos>")]
    cfg = model.module.config
    assert model.kv_bytes_per_token() == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (64 // 4) * 4
    assert model.warmup_prompt() == {"messages": [{"role": "user", "content": "Hello"}]}
    assert resolved.batching.engine_config() == EngineConfig(max_num_seqs=16, max_num_batched_tokens=256,
                                                             max_model_len=1024, max_waiting=64,
                                                             prefix_cache_mb=256, speculative="off")
    assert resolved.batching.max_request_items() == 1


def test_prompts_tokenize_through_the_chat_template_or_as_text(tiny_lm):
    model, _ = tiny_lm
    tok = model.tokenizer
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
                "<|im_start|>assistant\n")
    ids = model.prompt_ids({"messages": messages})
    assert ids == tok(expected)["input_ids"] and tok.decode(ids) == expected
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the special token is one id, not its characters
    assert model.prompt_ids({"text": "hello world"}) == tok("hello world")["input_ids"]
    with pytest.raises(RequestError) as info:
        model.prompt_ids({"text": "x" * 32_001})
    assert info.value.status == 413 and "max_prompt_chars" in info.value.message
    with pytest.raises(RequestError) as info:
        model.prompt_ids({"messages": [{"role": "user"}]})
    assert info.value.field == "messages[0]"


def test_a_tokenizer_without_chat_template_refuses_messages(tiny_lm, monkeypatch):
    model, _ = tiny_lm
    monkeypatch.setattr(model.tokenizer, "chat_template", None)
    with pytest.raises(RequestError) as info:
        model.prompt_ids({"messages": [{"role": "user", "content": "hi"}]})
    assert info.value.status == 400 and info.value.field == "messages"
    assert "/v1/completions" in info.value.message


def test_engine_greedy_equals_generate(tiny_lm):
    model, _ = tiny_lm
    # float64 so batching's reordered sums cannot flip an argmax between near-tied random logits.
    model.module = model.module.double()
    try:
        prompt = model.prompt_ids({"messages": [{"role": "user", "content": "what is the capital of france?"}]})
        n = 12
        ref = model.module.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        expected = ref[0, len(prompt):].tolist()
        cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64)  # the prompt is chunked
        ids, _, reason = _generate(model, prompt, n, cfg, ignore_eos=True)
        assert ids == expected and reason == "length"
    finally:
        model.module = model.module.float()


# --- config errors name the key and the fix ------------------------------------------------------------
def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    return str(info.value)


def test_hf_causal_lm_path_errors(tmp_path):
    text = _problems(["model=hf_causal_lm", "batching=continuous"])
    assert "model.path: missing required value" in text and "model.path=..." in text
    text = _problems(["model=hf_causal_lm", f"model.path={tmp_path / 'nope'}", "batching=continuous"])
    assert "model.path: no such model folder" in text and "local Hugging Face causal-LM folder" in text
    text = _problems(["model=hf_causal_lm", f"model.path={tmp_path}", "batching=continuous"])
    assert "model.path:" in text and "has no config.json" in text
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    text = _problems(["model=hf_causal_lm", f"model.path={tmp_path}", "batching=continuous", "model.dtype=int8"])
    assert "model_type 'gpt2' has no batched forward" in text and "supported model_type values: llama" in text
    assert "model.dtype: must be one of float32, bfloat16, float16" in text


def test_continuous_batching_refuses_a_one_shot_model():
    text = _problems(["model=echo", "batching=continuous"])
    assert ("batching: batching=continuous schedules token generation; model=echo is a one-shot model: "
            "use batching=adaptive") in text


def test_continuous_budgets_are_validated():
    text = _problems(["model=smollm2", "batching=continuous", "batching.max_num_batched_tokens=8",
                      "batching.max_waiting=0"])
    assert "batching.max_num_batched_tokens: must be > max_num_seqs (16)" in text
    assert "batching.max_waiting: must be >= 1, got 0" in text


def test_smollm2_picks_continuous_batching_and_refuses_others():
    assert compose([]).batching.name == "adaptive" and compose([]).model.name == "minilm"
    # conf/model/smollm2.yaml overrides serve.yaml's default batcher; the command line still wins.
    assert compose(["model=smollm2"]).batching.name == "continuous"
    text = _problems(["model=smollm2", "batching=adaptive"])
    assert "model.batching: a generative model runs on the continuous-batching engine; use batching=continuous" in text
    resolved = validate(compose(["model=smollm2", "batching=continuous"]))
    assert resolved.model.served_name() == "SmolLM2-135M-Instruct"
    assert resolved.model.identity()["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------
def test_smollm2_answers_the_capital_of_france_and_restarts_from_kept_weights(tmp_path):
    from plugins.model._causal_lm import packaged_smollm2_gguf

    try:
        packaged_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    overrides = ["model=smollm2", f"model.weights_cache_dir={tmp_path}"]
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=128)
    answers = []
    for _start in range(2):  # the first dequantizes the GGUF and keeps it; the second loads what was kept
        model = validate(compose(overrides)).model
        model.load("cpu")
        _, text, _ = _generate(model, model.prompt_ids(question), 16, config)
        answers.append(text)
    assert answers[0].startswith("The capital of France is Paris."), answers[0]
    assert answers[1] == answers[0]  # the kept weights are the same numbers
    kept = [p for p in tmp_path.iterdir() if (p / "hydraserve-ready").is_file()]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()

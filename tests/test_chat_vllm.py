"""The chat suite (tests/test_chat_e2e.py) against ``model.engine=vllm``: the same cases, the same
official ``openai`` client, on servers whose worker runs vLLM in process. Plus what is vLLM's own:
its knobs validated before start, a cache hit that never reaches vLLM, the start-up report.

The vLLM cases need vLLM installed (``make install-vllm`` makes ``.venv-vllm``; ``make test`` runs this
file there); elsewhere they are skipped, saying so. The validation cases run everywhere.
"""

from __future__ import annotations

import httpx
import pytest
import test_chat_e2e as cases

from plugins.model._vllm_engine import engine_args, vllm_missing

WHY_NOT = vllm_missing()
needs_vllm = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

# enforce_eager: no torch.compile of the tiny model (start-up in seconds, and CI has 2 cores);
# a small KV cache: the chat cases need 4 x 16384 positions at most.
VLLM = ["model.engine=vllm", "model.vllm.enforce_eager=true", "model.vllm.kv_cache_gib=0.25"]


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """The tiny chat model in a shape vLLM loads (the cases read its tokenizer from here too)."""
    from tiny_chat_model import write_tiny_vllm_chat_model

    return write_tiny_vllm_chat_model(tmp_path_factory.mktemp("tiny_vllm_chat"))


def _serve(serve_module, tiny_chat_dir, *overrides):
    return serve_module(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
                         *VLLM, *overrides])


@pytest.fixture(scope="module")
def chat(serve_module, tiny_chat_dir):
    return _serve(serve_module, tiny_chat_dir, "batching.max_num_seqs=4", "batching.max_model_len=16384",
                  "cache=none", "tracing=file")


@pytest.fixture(scope="module")
def one_slot(serve_module, tiny_chat_dir):
    return _serve(serve_module, tiny_chat_dir, "batching.max_num_seqs=1", "batching.max_num_batched_tokens=64",
                  "batching.max_waiting=1", "batching.max_model_len=16384", "cache=none", "tracing=none")


@pytest.fixture(scope="module")
def cached_chat(serve_module, tiny_chat_dir):
    return _serve(serve_module, tiny_chat_dir, "cache=memory", "tracing=none")


# Every case of the native suite, collected here with the fixtures above (vLLM servers).
for _name in dir(cases):
    if _name.startswith("test_"):
        globals()[_name] = needs_vllm(getattr(cases, _name))


@needs_vllm
def test_the_worker_runs_vllm(chat):
    engine = httpx.get(chat.url + "/info", timeout=10).json()["engine"][0]
    assert engine["engine"] == "vllm" and engine["vllm_version"]
    assert engine["vllm_args"]["max_num_seqs"] == 4 and engine["vllm_args"]["max_model_len"] == 16384


@needs_vllm
def test_a_repeated_deterministic_request_never_reaches_vllm(cached_chat):
    body = {"messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 6, "temperature": 0}
    url = cached_chat.url + "/v1/chat/completions"
    first = httpx.post(url, json=body, timeout=60)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    before = cases.metric_samples(cached_chat)
    for _ in range(3):
        hit = httpx.post(url, json=body, timeout=60)
        assert hit.headers["x-cache"] == "hit" and hit.json()["choices"] == first.json()["choices"]
    after = cases.metric_samples(cached_chat)
    # Neither a prompt token nor a generated one: vLLM saw none of the three.
    for name in ("hydraserve_prompt_tokens_total", "hydraserve_generation_tokens_total",
                 "hydraserve_request_prompt_tokens_count"):
        assert after[name] == before[name], name


@needs_vllm
def test_vllm_prefix_cache_reuse_shows_in_metrics(chat):
    # A system prompt of several of vLLM's 128-token KV blocks, shared by two questions: the second
    # request's prompt finds its blocks (vLLM's automatic prefix caching, on as shipped).
    system = "the keeper of the lighthouse wrote down every ship that passed in the night. " * 30
    before = cases.metric_samples(chat)
    for question in ("who kept the light?", "what did the keeper write down?"):
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": 4, "temperature": 0}
        assert httpx.post(chat.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    after = cases.metric_samples(chat)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("hydraserve_prefix_cache_hits_total") >= 128
    assert moved("hydraserve_prefix_cache_queries_total") > moved("hydraserve_prefix_cache_hits_total")


# --- validated before start (no vLLM needed) ------------------------------------------------------------
def _problems(overrides: list[str]) -> str:
    from framework.config import compose, validate
    from framework.errors import ConfigError

    try:
        validate(compose(overrides))
    except ConfigError as exc:
        return str(exc)
    return ""


def test_bad_vllm_knobs_are_refused_naming_the_field():
    text = _problems(["model=smollm2", "model.engine=vlm", "model.vllm.kv_cache_gib=0", "model.vllm.block_size=10"])
    assert "model.engine: must be one of native, vllm, got 'vlm'" in text
    assert "model.vllm.kv_cache_gib: must be > 0" in text
    assert "model.vllm.block_size: must be a positive multiple of 16" in text


def test_engine_vllm_refuses_what_it_cannot_run(tiny_chat_dir):
    text = _problems(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.engine=vllm",
                      "quantization=int8_weight_only", "batching.speculative=ngram"])
    assert "quantization: quantization=" in text and "model.vllm.quantization" in text
    assert "batching.speculative" in text
    if WHY_NOT is not None:  # and without vLLM installed, validate says how to install it
        assert "pip install 'hydraserve[vllm]'" in text and "model.engine=native" in text


def test_the_batching_budgets_are_vllms_scheduler_limits():
    from framework.generation import EngineConfig
    from plugins.model._vllm_engine import VllmOptions

    args = engine_args("/m", "float32", VllmOptions(kv_cache_gib=0.5, quantization="awq"),
                       EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096))
    assert args["max_num_seqs"] == 8 and args["max_num_batched_tokens"] == 512 and args["max_model_len"] == 4096
    assert args["kv_cache_memory_bytes"] == 2**29 and args["quantization"] == "awq"
    assert args["enable_prefix_caching"] is True and "block_size" not in args


def test_the_dequantized_gguf_folder_is_made_loadable_by_vllm(tmp_path):
    """What the GGUF path leaves (quantization_config gguf, a tied embedding saved as lm_head.weight) is
    fixed for vLLM, and the folder still loads in transformers with the same logits."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from plugins.model._generative import _drop_gguf_quantization_config, _untie_embedding_key

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True)).eval()
    save_model(model, str(tmp_path / "model.safetensors"))  # keeps one name of the tied pair
    model.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gguf"}}))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        if "model.embed_tokens.weight" in f.keys():
            pytest.skip("this safetensors keeps the embedding's name: nothing to fix")
    _drop_gguf_quantization_config(tmp_path / "config.json")
    _untie_embedding_key(tmp_path)
    _untie_embedding_key(tmp_path)  # idempotent
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)

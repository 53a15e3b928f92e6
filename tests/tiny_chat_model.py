"""A tiny random-weight Llama chat model written to a folder as ``save_pretrained`` does, for tests of
the generative model plugins (``model=hf_causal_lm model.path=<folder>``). Built in code in about a
second: a byte-level BPE tokenizer with ChatML-style special tokens and a chat template, and a
2-layer Llama with hidden size 64. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france?",
          "hello world, hello engine", "café crème brûlée", "user assistant system"] * 4

#: A small ChatML-like Jinja chat template (the tokenizer's ``chat_template``).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<eos>"


def build_chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS, IM_START, IM_END], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_chat_model(tokenizer, **shape):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **shape}
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                      pad_token_id=tokenizer.convert_tokens_to_ids(EOS), **dims)
    model = LlamaForCausalLM(cfg).eval()
    # generation_config's EOS differs from the tokenizer's, so a plugin must merge both.
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(EOS)
    return model


def write_tiny_chat_model(folder: Path) -> Path:
    """Write the tiny chat model (config.json, weights, tokenizer with chat template) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chat_tokenizer()
    build_chat_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


#: vLLM's CPU attention takes head sizes 32, 64, 80, ... (not this model's 16): 2 heads of 32, and
#: positions for the chat tests' max_model_len (vLLM refuses one beyond max_position_embeddings).
VLLM_SHAPE = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16384}


def write_tiny_vllm_chat_model(folder: Path) -> Path:
    """The tiny chat model (same tokenizer and chat template) in a shape vLLM can load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chat_tokenizer()
    build_chat_model(tokenizer, **VLLM_SHAPE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

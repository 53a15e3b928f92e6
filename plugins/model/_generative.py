"""A Hugging Face causal LM as a ``GenerativeModelPlugin``: chat / completion prompts to token ids, the
batched forward the generation engine steps, and the model's end-of-sequence ids.

Shared by ``smollm2`` (SmolLM2-135M-Instruct from the packaged GGUF) and ``hf_causal_lm`` (any local
HF causal-LM folder). Weights are read from disk only (``local_files_only``): nothing is downloaded.
The batched forward is architecture-specific; ``BATCHED_FORWARDS`` lists the ``model_type`` values
that have one, and any other architecture is refused with that list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import CheckContext, GenerativeModelPlugin, RequestError
from plugins.model._vllm_engine import VllmOptions

DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("native", "vllm")


def _llama_forward(model: Any, max_num_seqs: int, max_model_len: int, compile_mode: str = "off",
                   packed_weights: bool = False) -> Any:
    from plugins.model._llama_batched import LlamaBatchedForward

    return LlamaBatchedForward(model, max_num_seqs, max_model_len, compile_mode=compile_mode,
                               packed_weights=packed_weights)


#: ``config.model_type`` -> the ``BatchedCausalLM`` builder for that architecture.
BATCHED_FORWARDS = {"llama": _llama_forward}


def unsupported_architecture(model_type: Any) -> str | None:
    """Why ``model_type`` cannot be served (``None`` when it can)."""
    if model_type in BATCHED_FORWARDS:
        return None
    return (f"model_type {model_type!r} has no batched forward for the generation engine; supported "
            f"model_type values: {', '.join(sorted(BATCHED_FORWARDS))}")


@dataclass
class CausalLMConfig:
    dtype: str = "float32"  # weights and KV cache: float32, bfloat16 or float16 (GGUF is dequantized to it)
    served_name: str = ""  # the model id /v1/models lists and responses carry ("" = the plugin's default)
    max_prompt_chars: int = 32_000  # characters of one prompt (all messages' contents together); 413 above
    # The quantization quality gate's floor (framework/generation/quality.py): greedy token agreement of the
    # quantized model with the full-precision one. None measures without refusing.
    min_token_agreement: float | None = 0.9
    # native: hydraserve's engine (framework/generation/); vllm: vLLM's, in the worker process (model.vllm.*)
    engine: str = "native"
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.dtype not in DTYPES:
            out.append(("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}"))
        if self.max_prompt_chars < 1:
            out.append(("max_prompt_chars", f"must be >= 1, got {self.max_prompt_chars}"))
        if self.min_token_agreement is not None and not 0.0 <= self.min_token_agreement <= 1.0:
            out.append(("min_token_agreement", f"must be in [0, 1] (null: no floor), got {self.min_token_agreement}"))
        if self.engine not in ENGINES:
            out.append(("engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}"))
        out.extend((f"vllm.{k}", m) for k, m in self.vllm.problems())
        return out


_READY = "hydraserve-ready"  # written last: a folder without it is an interrupted save, never loaded


def _save_dequantized(tokenizer: Any, model: Any, folder: Path) -> None:
    """Save dequantized weights (safetensors, no pickle) for the next start; a failure only costs that."""
    import logging
    import os
    import shutil

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        # transformers refuses save_pretrained on a GGUF-loaded model (it counts as quantized), though the
        # weights are plain tensors by now: write them with safetensors, the config beside them.
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _READY).write_text("ok\n")
        os.replace(tmp, folder)  # atomic: another worker saving the same folder loses the race harmlessly
    except (OSError, ValueError, RuntimeError) as exc:
        logging.getLogger("hydraserve.model").warning("could not keep dequantized weights in %s: %s", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CausalLMPlugin(GenerativeModelPlugin):
    """Subclasses say where the weights are: ``source()`` -> ``(path, gguf_file or None)``."""

    Config = CausalLMConfig
    default_served_name = "causal-lm"

    # --- where the weights are (cheap; no weights read) ---------------------------------------
    def source(self) -> tuple[Path, str | None]:
        raise NotImplementedError

    def served_name(self) -> str:
        return str(self.config.served_name or self.default_served_name)

    def identity(self) -> dict:
        path, gguf_file = self.source()
        ident: dict[str, Any] = {"model": self.served_name(), "path": str(path), "dtype": self.config.dtype}
        if gguf_file is not None:
            ident["gguf_file"] = gguf_file
        if self.config.engine != "native":  # another engine's numerics: another cached answer
            ident["engine"] = self.config.engine
            ident["vllm_quantization"] = self.config.vllm.quantization
        return ident

    def check(self, ctx: CheckContext) -> list[str]:
        found = super().check(ctx)
        if self.config.engine != "vllm":
            return found
        from plugins.model._vllm_engine import vllm_missing

        why = vllm_missing()
        if why is not None:
            found.append(f"engine: {why}")
        q = ctx.quantization
        if q is not None and not q.is_identity():
            found.append(f"quantization: quantization={q.scheme_name} rewrites hydraserve's own engine; with "
                         "model.engine=vllm use quantization=none, and model.vllm.quantization for a "
                         "pre-quantized checkpoint (or model.dtype=bfloat16)")
        engine_config = ctx.batching.engine_config() if ctx.batching is not None else None
        if getattr(engine_config, "speculative", "off") != "off":
            found.append("batching.speculative: the native engine's speculative decoding does not apply to "
                         "model.engine=vllm; set batching.speculative=off")
        path, gguf_file = self.source()
        if gguf_file is not None and not getattr(self.config, "weights_cache_dir", None):
            found.append("weights_cache_dir: model.engine=vllm loads the GGUF's dequantized safetensors from "
                         "model.weights_cache_dir; set it to a folder (e.g. ~/.cache/hydraserve/models)")
        return found

    # --- the vLLM engine (model.engine=vllm) -------------------------------------------------------
    def vllm_model_dir(self) -> Path:
        """The folder vLLM loads: the HF folder itself, or a GGUF's dequantized safetensors (written
        here on first use, as the native engine's load does)."""
        from plugins.model._causal_lm import load_causal_lm

        path, gguf_file = self.source()
        cached = self._dequantized_folder(path, gguf_file)
        if gguf_file is None:
            return path
        if cached is None:
            raise ValueError("model.engine=vllm needs model.weights_cache_dir for a GGUF model")
        if not (cached / _READY).is_file():
            tokenizer, model = load_causal_lm(path, gguf_file, dtype=self.torch_dtype())
            _save_dequantized(tokenizer, model, cached)
            del model
            if not (cached / _READY).is_file():
                raise ValueError(f"could not write the dequantized weights vLLM loads into {cached}")
        _drop_gguf_quantization_config(cached / "config.json")
        _untie_embedding_key(cached)
        return cached

    def generation_engine(self, device: str, config: Any) -> Any | None:
        if self.config.engine != "vllm":
            return None
        from plugins.model._causal_lm import transformers_importable
        from plugins.model._vllm_engine import VllmEngine, import_vllm

        import_vllm()  # first: it hides the media packages transformers would otherwise probe
        folder = self.vllm_model_dir()
        with transformers_importable():
            from transformers import AutoTokenizer, GenerationConfig

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            try:
                self._generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError):
                self._generation_config = None
        self.device = device
        return VllmEngine.build(str(folder), self.config.dtype, self.config.vllm, config, self.eos_token_ids())

    # --- inference worker ------------------------------------------------------------------------
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.config.dtype)

    def load(self, device: str) -> None:
        from plugins.model._causal_lm import load_causal_lm

        path, gguf_file = self.source()
        self.device = device
        cached = self._dequantized_folder(path, gguf_file)
        if cached is not None and (cached / _READY).is_file():
            # A GGUF dequantized by an earlier start, saved as safetensors: seconds instead of ~25 s.
            self.tokenizer, model = load_causal_lm(cached, None, dtype=self.torch_dtype())
        else:
            self.tokenizer, model = load_causal_lm(path, gguf_file, dtype=self.torch_dtype())
            if cached is not None:
                _save_dequantized(self.tokenizer, model, cached)
        why = unsupported_architecture(getattr(model.config, "model_type", None))
        if why is not None:
            raise ValueError(f"{type(self).__name__} cannot serve {path / (gguf_file or '')}: {why}")
        self.module = model.eval().to(device)

    def _dequantized_folder(self, path: Path, gguf_file: str | None) -> Path | None:
        """Where this GGUF's dequantized weights are kept between starts (``model.weights_cache_dir``);
        the name holds the file's size and modification time and the dtype, so a changed file or
        another dtype never loads stale weights. ``None`` when off or not a GGUF."""
        root = getattr(self.config, "weights_cache_dir", None)
        if gguf_file is None or not root:
            return None
        try:
            stat = (path / gguf_file).stat()
        except OSError:
            return None
        return Path(root).expanduser() / f"{Path(gguf_file).stem}-{stat.st_size}-{stat.st_mtime_ns}-{self.config.dtype}"

    def prompt_ids(self, prompt: dict) -> list[int]:
        from plugins.model._causal_lm import chat_prompt_ids

        if not isinstance(prompt, dict):
            raise RequestError("a prompt is {\"messages\": [...]} or {\"text\": \"...\"}", field="prompt")
        limit = self.config.max_prompt_chars
        if "messages" in prompt:
            messages = prompt["messages"]
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"}", field="messages")
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise RequestError(f"'messages[{i}]' must be {{\"role\": str, \"content\": str}}",
                                       field=f"messages[{i}]")
            chars = sum(len(m["content"]) for m in messages)
            if chars > limit:
                raise RequestError(f"the messages hold {chars} characters; at most {limit} (model.max_prompt_chars)",
                                   field="messages", status=413)
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(f"model {self.served_name()} has no chat template, so it cannot take chat "
                                   "messages; send the prompt as text to /v1/completions", field="messages", status=400)
            return chat_prompt_ids(self.tokenizer, messages)
        if "text" in prompt:
            text = prompt["text"]
            if not isinstance(text, str):
                raise RequestError("'prompt' must be a string", field="prompt")
            if len(text) > limit:
                raise RequestError(f"the prompt has {len(text)} characters; at most {limit} (model.max_prompt_chars)",
                                   field="prompt", status=413)
            # The tokenizer's own special-token behaviour (e.g. a BOS for Llama-2-style tokenizers).
            return [int(t) for t in self.tokenizer(text)["input_ids"]]
        raise RequestError("a prompt is {\"messages\": [...]} or {\"text\": \"...\"}", field="prompt")

    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        candidates: list[Any] = [eos]
        gen = getattr(self.module, "generation_config", None) or getattr(self, "_generation_config", None)
        gen_eos = getattr(gen, "eos_token_id", None)
        candidates += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        for t in candidates:
            if t is not None and int(t) not in ids:
                ids.append(int(t))
        return ids

    def batched_forward(self, max_num_seqs: int, max_model_len: int, compile_mode: str = "off",
                        packed_weights: bool = False) -> Any:
        model_type = getattr(self.module.config, "model_type", None)
        why = unsupported_architecture(model_type)
        if why is not None:
            raise ValueError(why)
        return BATCHED_FORWARDS[model_type](self.module, max_num_seqs, max_model_len, compile_mode, packed_weights)

    def kv_bytes_per_token(self) -> int | None:
        if self.module is None:
            return None
        cfg = self.module.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        element = next(self.module.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * element  # K and V, every layer

    def warmup_prompt(self) -> dict:
        if getattr(self.tokenizer, "chat_template", None):
            return {"messages": [{"role": "user", "content": "Hello"}]}
        return {"text": "Hello"}


def _drop_gguf_quantization_config(config_json: Path) -> None:
    """transformers keeps ``quantization_config: {quant_method: gguf}`` in a GGUF-loaded model's config, and
    vLLM refuses the folder for it (``Unknown quantization method: gguf``), though the saved tensors are
    plain dequantized ones: drop it (atomically; idempotent)."""
    import os

    cfg = json.loads(config_json.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del cfg["quantization_config"]
    tmp = config_json.with_name(f"config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, config_json)


def _untie_embedding_key(folder: Path) -> None:
    """safetensors' ``save_model`` keeps one name of tied tensors, here ``lm_head.weight``; vLLM, with
    ``tie_word_embeddings``, skips ``lm_head.weight`` and loads ``model.embed_tokens.weight``, so without
    it every answer is ``<|endoftext|>``. Store the tensor under the embedding's name (the usual HF
    layout, which transformers loads and ties as well). Atomic; idempotent."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    if not cfg.get("tie_word_embeddings") or not weights.is_file():
        return
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        if "model.embed_tokens.weight" in keys or "lm_head.weight" not in keys:
            return
        tensors = {("model.embed_tokens.weight" if k == "lm_head.weight" else k): f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    tmp = weights.with_name(f"model.safetensors.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, weights)


def folder_model_type(folder: Path) -> Any:
    """``model_type`` from ``folder/config.json`` (``None`` if unreadable): checked before any weights load."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None

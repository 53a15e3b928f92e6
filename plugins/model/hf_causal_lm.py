"""``model=hf_causal_lm model.path=/local/hf/folder``: any local Hugging Face causal LM (config.json,
weights and tokenizer files) served on the OpenAI routes under ``batching=continuous``; offline.
The architecture must have a batched forward (``model_type: llama`` for now) unless ``model.engine=vllm``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from framework import CheckContext
from plugins.model._generative import CausalLMConfig, CausalLMPlugin, folder_model_type, unsupported_architecture


@dataclass
class HfCausalLMConfig(CausalLMConfig):
    path: str = "???"  # required: a local HF causal-LM folder; there is no sensible default
    served_name: str = ""  # the model id /v1/models lists ("" = the folder's name)


class HfCausalLM(CausalLMPlugin):
    Config = HfCausalLMConfig

    def folder(self) -> Path:
        return Path(os.path.expanduser(self.config.path)).resolve()

    def source(self) -> tuple[Path, str | None]:
        return self.folder(), None

    def served_name(self) -> str:
        return str(self.config.served_name or self.folder().name)

    def check(self, ctx: CheckContext) -> list[str]:
        found = super().check(ctx)
        folder = self.folder()
        if not folder.is_dir():
            found.append(f"path: no such model folder: {self.config.path}; point model.path at a local Hugging "
                         "Face causal-LM folder (config.json, tokenizer files and weights)")
        elif not (folder / "config.json").is_file():
            found.append(f"path: {self.config.path} has no config.json; point model.path at the folder "
                         "save_pretrained wrote (config.json, tokenizer files and weights)")
        elif self.config.engine == "native":  # vLLM brings its own architectures (it names what it lacks)
            model_type = folder_model_type(folder)
            why = unsupported_architecture(model_type)
            if why is not None:
                found.append(f"path: {self.config.path}: {why}")
        return found


PLUGIN = HfCausalLM

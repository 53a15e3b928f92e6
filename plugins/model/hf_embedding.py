"""``model=hf_embedding model.path=/local/hf/folder``: sentence embeddings from any local HF encoder."""

from __future__ import annotations

from dataclasses import dataclass

from plugins.model._text_embedding import TextEmbeddingConfig, TextEmbeddingModel


@dataclass
class HfEmbeddingConfig(TextEmbeddingConfig):
    path: str | None = "???"  # required: there is no sensible default folder


class HfEmbedding(TextEmbeddingModel):
    Config = HfEmbeddingConfig
    display_name = "hf-embedding"


PLUGIN = HfEmbedding

"""``model=minilm`` (default): the packaged all-MiniLM-L6-v2 sentence embedder, offline."""

from __future__ import annotations

from plugins.model._text_embedding import TextEmbeddingModel


class MiniLM(TextEmbeddingModel):
    display_name = "all-MiniLM-L6-v2"


PLUGIN = MiniLM

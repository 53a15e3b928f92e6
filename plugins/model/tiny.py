"""``model=tiny model.path=DIR``: a small MLP that tests build in a temporary folder.

``TinyModel.build(DIR)`` writes ``config.json`` and ``model.safetensors``; nothing is downloaded.
A request is ``{"input": [x1, ..., xN]}`` (one vector) or ``{"input": [[...], [...]]}`` (several);
the answer is ``{"outputs": [[...], ...]}``. ``delay_ms`` makes each forward pass slower and
``fail_marker`` makes it raise, so tests can exercise overload, deadlines and model failures.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework import ModelPlugin, RequestError


@dataclass
class TinyConfig:
    path: str = "???"  # folder written by TinyModel.build
    delay_ms: float = 0.0  # added to every forward pass (simulates a slow model)
    fail_marker: float | None = None  # an input whose first value equals this makes forward raise
    max_items: int = 256

    def problems(self) -> list[tuple[str, str]]:
        folder = Path(os.path.expanduser(self.path))
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            return [("path", f"{self.path} has no config.json + model.safetensors; create one with "
                     "plugins.model.tiny.TinyModel.build(folder)")]
        return []


class TinyModel(ModelPlugin):
    task = "tensor"
    Config = TinyConfig

    @staticmethod
    def build(folder: str | os.PathLike, in_dim: int = 8, hidden: int = 32, out_dim: int = 4, seed: int = 0) -> Path:
        import torch
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        weights = {
            "0.weight": torch.randn(hidden, in_dim, generator=gen) / math.sqrt(in_dim),
            "0.bias": torch.zeros(hidden),
            "2.weight": torch.randn(out_dim, hidden, generator=gen) / math.sqrt(hidden),
            "2.bias": torch.zeros(out_dim),
        }
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"in_dim": in_dim, "hidden": hidden, "out_dim": out_dim}))
        return folder

    def _meta(self) -> dict:
        if not hasattr(self, "_meta_cache"):
            folder = Path(os.path.expanduser(self.config.path))
            self._meta_cache = json.loads((folder / "config.json").read_text())
        return self._meta_cache

    # --- API process -------------------------------------------------------------------------
    def decode(self, body: dict) -> list[Any]:
        if "input" not in body:
            raise RequestError("missing field 'input': send a vector or a list of vectors", field="input")
        value = body["input"]
        dim = self._meta()["in_dim"]
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            items = value
        elif isinstance(value, list) and value:
            items = [value]
        else:
            raise RequestError(f"'input' must be a list of {dim} numbers or a non-empty list of such lists",
                               field="input")
        if len(items) > self.config.max_items:
            raise RequestError(f"'input' has {len(items)} items; at most {self.config.max_items} allowed",
                               field="input", status=413)
        for i, item in enumerate(items):
            if len(item) != dim or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in item):
                raise RequestError(f"'input[{i}]' must be {dim} numbers (shape [{dim}], float32)",
                                   field=f"input[{i}]")
        return items

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"outputs": outputs}

    def identity(self) -> dict:
        folder = Path(os.path.expanduser(self.config.path)).resolve()
        stat = (folder / "model.safetensors").stat()
        return {"model": "tiny", "path": str(folder), "weights": f"{stat.st_size}:{stat.st_mtime_ns}"}

    # --- inference worker --------------------------------------------------------------------
    def load(self, device: str) -> None:
        import torch
        from safetensors.torch import load_file

        meta = self._meta()
        module = torch.nn.Sequential(
            torch.nn.Linear(meta["in_dim"], meta["hidden"]),
            torch.nn.ReLU(),
            torch.nn.Linear(meta["hidden"], meta["out_dim"]),
        )
        module.load_state_dict(load_file(str(Path(os.path.expanduser(self.config.path)) / "model.safetensors")))
        self.device = device
        self.module = module.eval().to(device)

    def preprocess(self, items: list[Any]) -> Any:
        import torch

        return torch.tensor(items, dtype=torch.float32, device=self.device)

    def forward(self, batch: Any) -> Any:
        import torch

        if self.config.fail_marker is not None and bool((batch[:, 0] == self.config.fail_marker).any()):
            raise RuntimeError("tiny model failure requested by fail_marker")
        if self.config.delay_ms:
            time.sleep(self.config.delay_ms / 1000.0)
        with torch.inference_mode():
            return self.module(batch)

    def postprocess(self, outputs: Any) -> list[Any]:
        return outputs.detach().float().cpu().tolist()

    def calibration_items(self) -> list[Any]:
        import torch

        gen = torch.Generator().manual_seed(1234)
        return torch.randn(16, self._meta()["in_dim"], generator=gen).tolist()

    def quality(self, reference: Any, candidate: Any) -> dict:
        import torch

        cos = torch.nn.functional.cosine_similarity(reference.float(), candidate.float(), dim=1)
        return {"metric": "cosine", "min": float(cos.min()), "mean": float(cos.mean()),
                "max_abs_error": float((reference.float() - candidate.float()).abs().max())}


PLUGIN = TinyModel

"""``quantization=fp16``: cast the weights to float16 (GPU only; refused on the CPU, where it is emulated).

Inputs and outputs stay float32 at the edges; skipped modules stay float32 with casts at their boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.quantization._common import QuantConfig, SchemePlugin, cast_module


@dataclass
class Fp16Config(QuantConfig):
    min_quality: float | None = 0.995  # fp16 has more mantissa than bf16 but a narrow range


class Fp16(SchemePlugin):
    Config = Fp16Config
    scheme = "fp16"

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        import torch

        wrapped, kept = cast_module(module, torch.float16, self.config)
        return wrapped, {"dtype": "float16", "kept_full_precision": kept}


PLUGIN = Fp16

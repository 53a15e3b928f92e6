"""``quantization=bf16``: cast the weights to bfloat16 (inputs and outputs stay float32 at the edges).

Half the memory of fp32, no calibration; runs on GPUs with compute capability >= 8.0 and on CPUs with
native bfloat16 (avx512_bf16 / AMX). Skipped modules stay float32 with casts at their boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.quantization._common import QuantConfig, SchemePlugin, cast_module


@dataclass
class Bf16Config(QuantConfig):
    min_quality: float | None = 0.995  # bf16 keeps 8 mantissa bits: cosine to fp32 is ~0.9999 on encoders


class Bf16(SchemePlugin):
    Config = Bf16Config
    scheme = "bf16"

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        import torch

        wrapped, kept = cast_module(module, torch.bfloat16, self.config)
        return wrapped, {"dtype": "bfloat16", "kept_full_precision": kept}


PLUGIN = Bf16

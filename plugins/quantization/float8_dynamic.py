"""``quantization=float8_dynamic``: float8 (e4m3) weights and activations with per-row scales
(torchao ``Float8DynamicActivationFloat8WeightConfig``): float8 tensor-core matmuls.

Needs CUDA compute capability >= 8.9 (Ada, Hopper or newer). The module is cast to bfloat16 first
(torchao's per-row float8 requires bf16 weights); inputs and outputs stay float32 at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.quantization._common import QuantConfig, SchemePlugin, cast_module, choice_problems, quantize_linears

GRANULARITIES = ("per_row", "per_tensor")


@dataclass
class Float8DynamicConfig(QuantConfig):
    granularity: str = "per_row"  # per_row: a scale per token / output channel (accurate); per_tensor: one each
    min_quality: float | None = 0.99

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        out += choice_problems("granularity", self.granularity, GRANULARITIES)
        return out


class Float8Dynamic(SchemePlugin):
    Config = Float8DynamicConfig
    scheme = "float8_dynamic"

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        import torch
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        cfg = self.config
        inner = module
        wrapped, kept = cast_module(inner, torch.bfloat16, cfg)
        ao = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if cfg.granularity == "per_row" else PerTensor())
        # torchao leaves layers whose dimensions are not multiples of 16 in bf16 (float8 GEMM alignment)
        summary = quantize_linears(inner, ao, cfg, compatible=lambda lin: lin.in_features % 16 == 0
                                   and lin.out_features % 16 == 0)
        summary["kept_full_precision"] = sorted(set(kept) | set(summary["kept_full_precision"]))
        return wrapped, {"weights": "float8_e4m3", "activations": "float8_e4m3 (dynamic)",
                         "granularity": cfg.granularity, **summary}


PLUGIN = Float8Dynamic

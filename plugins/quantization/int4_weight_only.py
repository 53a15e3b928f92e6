"""``quantization=int4_weight_only``: int4 weights in groups, bfloat16 activations (torchao
``Int4WeightOnlyConfig``). An eighth of fp32's weight memory; the GPU memory-bound decode scheme.

CUDA only in torchao 0.18 (no CPU layout; see ``_common``). The module is cast to bfloat16 first
(tinygemm computes in bf16); inputs and outputs stay float32 at the edges.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from framework import CheckContext
from plugins.quantization._common import QuantConfig, SchemePlugin, cast_module, quantize_linears

GROUP_SIZES = (32, 64, 128, 256)
PACKINGS = ("tile_packed_to_4d", "plain", "preshuffled")


@dataclass
class Int4WeightOnlyConfig(QuantConfig):
    group_size: int = 128  # input features per scale/zero point: 32, 64, 128 or 256 (smaller: more accurate)
    packing: str = "tile_packed_to_4d"  # tinygemm (any CUDA >= 8.0); plain / preshuffled need the mslk package
    min_quality: float | None = 0.98  # 4 bits lose more than 8: a lower floor

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if self.group_size not in GROUP_SIZES:
            out.append(("group_size", f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"))
        if self.packing not in PACKINGS:
            out.append(("packing", f"must be one of {', '.join(PACKINGS)}, got '{self.packing}'"))
        return out


class Int4WeightOnly(SchemePlugin):
    Config = Int4WeightOnlyConfig
    scheme = "int4_weight_only"

    def check(self, ctx: CheckContext) -> list[str]:
        found = super().check(ctx)
        if not found and self.config.packing in ("plain", "preshuffled") and importlib.util.find_spec("mslk") is None:
            found.append(f"packing: '{self.config.packing}' needs the mslk package (torchao's CUDA int4 "
                         "kernels), which is not installed; use packing=tile_packed_to_4d")
        return found

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        import torch
        from torchao.quantization import Int4WeightOnlyConfig as AoConfig

        cfg = self.config
        inner = module
        wrapped, kept = cast_module(inner, torch.bfloat16, cfg)
        summary = quantize_linears(inner, AoConfig(group_size=cfg.group_size, int4_packing_format=cfg.packing),
                                   cfg, compatible=lambda lin: lin.in_features % cfg.group_size == 0)
        summary["kept_full_precision"] = sorted(set(kept) | set(summary["kept_full_precision"]))
        return wrapped, {"weights": f"int4 (group {cfg.group_size})", "activations": "bfloat16", **summary}


PLUGIN = Int4WeightOnly

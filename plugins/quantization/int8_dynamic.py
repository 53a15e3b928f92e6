"""``quantization=int8_dynamic``: int8 weights and int8 activations quantized per call
(torchao ``Int8DynamicActivationInt8WeightConfig``): integer matmuls end to end.

The CPU winner *when compiled*: with ``hardware.compile`` on, torch.compile fuses the activation
quantization into int8 GEMMs (VNNI / AMX); eager it is slower than fp32, so ``check`` refuses
``hardware.compile=off`` on the CPU unless ``allow_slow: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.quantization._common import QuantConfig, SchemePlugin, choice_problems, quantize_linears

GRANULARITIES = ("per_row", "per_tensor")


@dataclass
class Int8DynamicConfig(QuantConfig):
    granularity: str = "per_row"  # per_row: one scale per token (activations) / output channel (weights)
    symmetric: bool = True  # activation mapping: symmetric (zero point 0) or asymmetric
    reduce_range: bool | None = None  # 7-bit ranges against overflow; null: only on CPUs without VNNI
    min_quality: float | None = 0.99

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        out += choice_problems("granularity", self.granularity, GRANULARITIES)
        return out


class Int8Dynamic(SchemePlugin):
    Config = Int8DynamicConfig
    scheme = "int8_dynamic"

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        import torch
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow, PerTensor
        from torchao.utils import should_reduce_range

        cfg = self.config
        reduce_range = cfg.reduce_range
        if reduce_range is None:
            reduce_range = should_reduce_range(torch.device(device))
        ao = Int8DynamicActivationInt8WeightConfig(
            granularity=PerRow() if cfg.granularity == "per_row" else PerTensor(),
            act_mapping_type=MappingType.SYMMETRIC if cfg.symmetric else MappingType.ASYMMETRIC,
            reduce_range=reduce_range,
        )
        summary = quantize_linears(module, ao, cfg)
        return module, {"weights": "int8", "activations": "int8 (dynamic)", "granularity": cfg.granularity,
                        "reduce_range": reduce_range, **summary}


PLUGIN = Int8Dynamic

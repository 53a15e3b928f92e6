"""``quantization=int8_weight_only``: int8 weights, float activations (torchao ``Int8WeightOnlyConfig``).

Quarter the weight memory of fp32: a memory saver (GPUs at small batch, large models). On the CPU it
is no faster than compiled fp32 (measured with MiniLM), and eager it is slower than fp32, so ``check``
refuses it with ``hardware.compile=off`` there unless ``allow_slow: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugins.quantization._common import QuantConfig, SchemePlugin, choice_problems, quantize_linears

GRANULARITIES = ("per_row", "per_tensor", "per_group")


@dataclass
class Int8WeightOnlyConfig(QuantConfig):
    granularity: str = "per_row"  # one scale per output channel; per_tensor; per_group (uses group_size)
    group_size: int = 128  # input features per scale with granularity=per_group
    min_quality: float | None = 0.99

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        out += choice_problems("granularity", self.granularity, GRANULARITIES)
        if self.group_size < 1:
            out.append(("group_size", f"must be >= 1, got {self.group_size}"))
        return out


class Int8WeightOnly(SchemePlugin):
    Config = Int8WeightOnlyConfig
    scheme = "int8_weight_only"

    def rewrite(self, module: Any, device: str) -> tuple[Any, dict]:
        from torchao.quantization import Int8WeightOnlyConfig as AoConfig
        from torchao.quantization import PerGroup, PerRow, PerTensor

        cfg = self.config
        granularity = {"per_row": PerRow(), "per_tensor": PerTensor(),
                       "per_group": PerGroup(cfg.group_size)}[cfg.granularity]
        compatible = None
        if cfg.granularity == "per_group":
            compatible = lambda lin: lin.in_features % cfg.group_size == 0  # noqa: E731
        summary = quantize_linears(module, AoConfig(granularity=granularity), cfg, compatible)
        return module, {"weights": "int8", "granularity": cfg.granularity, **summary}


PLUGIN = Int8WeightOnly

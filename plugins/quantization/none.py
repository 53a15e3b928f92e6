"""``quantization=none``: full precision as loaded (the reference every scheme is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from framework import QuantizationPlugin


@dataclass
class NoQuantizationConfig:
    min_quality: float | None = None


class NoQuantization(QuantizationPlugin):
    Config = NoQuantizationConfig

    def is_identity(self) -> bool:
        return True


PLUGIN = NoQuantization

"""``hardware=cpu``: run on the CPU (threads per worker, workers per machine, torch.compile)."""

from __future__ import annotations

from framework import HardwareInfo
from plugins.hardware._base import EngineHardware, cpu_info


class CpuHardware(EngineHardware):
    def info(self) -> HardwareInfo:
        return cpu_info()


PLUGIN = CpuHardware

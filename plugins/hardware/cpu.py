"""``hardware=cpu``: run on the CPU (threads per worker, workers per machine)."""

from __future__ import annotations

from framework import HardwareInfo
from plugins.hardware._base import EngineHardware


class CpuHardware(EngineHardware):
    def info(self) -> HardwareInfo:
        return HardwareInfo("cpu", available=True)


PLUGIN = CpuHardware

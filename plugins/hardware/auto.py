"""``hardware=auto``: CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

from framework import HardwareInfo
from plugins.hardware._base import EngineHardware, cpu_info, cuda_info


class AutoHardware(EngineHardware):
    def info(self) -> HardwareInfo:
        info = cuda_info()
        return info if info.available else cpu_info()


PLUGIN = AutoHardware

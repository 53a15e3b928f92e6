"""``hardware=cuda``: run on NVIDIA GPUs; refuses to start where none is visible."""

from __future__ import annotations

from framework import CheckContext, HardwareInfo
from plugins.hardware._base import EngineHardware, cuda_info


class CudaHardware(EngineHardware):
    def info(self) -> HardwareInfo:
        return cuda_info()

    def check(self, ctx: CheckContext) -> list[str]:
        if not self.info().available:
            return ["no CUDA device is visible to torch; use hardware=cpu or hardware=auto"]
        return super().check(ctx)


PLUGIN = CudaHardware

"""What the cpu, cuda and auto hardware plugins share: threads, placement and warm-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from framework import HardwareInfo, HardwarePlugin, ModelPlugin

log = logging.getLogger("hydraserve.hardware")


@dataclass
class EngineConfig:
    devices: int | None = None  # None: all visible devices of the accelerator (cpu: one)
    workers_per_device: int = 1
    threads: int | None = None  # torch intra-op threads per worker (CPU); None: torch's default
    warmup: bool = True

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.workers_per_device < 1:
            out.append(("workers_per_device", f"must be >= 1, got {self.workers_per_device}"))
        if self.threads is not None and self.threads < 1:
            out.append(("threads", f"must be >= 1 or null, got {self.threads}"))
        if self.devices is not None and self.devices < 1:
            out.append(("devices", f"must be >= 1 or null, got {self.devices}"))
        return out


def cuda_info() -> HardwareInfo:
    import torch

    if not torch.cuda.is_available():
        return HardwareInfo("cuda", available=False)
    return HardwareInfo("cuda", available=True, cuda_capability=torch.cuda.get_device_capability(0),
                        device_name=torch.cuda.get_device_name(0))


class EngineHardware(HardwarePlugin):
    Config = EngineConfig

    def devices(self) -> int | str:
        return self.config.devices if self.config.devices is not None else "auto"

    def setup_process(self) -> None:
        import torch

        if self.config.threads:
            torch.set_num_threads(self.config.threads)

    def optimize(self, model: ModelPlugin, device: str, batch_sizes: list[int]) -> None:
        if not self.config.warmup:
            return
        for size in batch_sizes:
            items = model.example_items(size)
            if items:
                model.postprocess(model.forward(model.preprocess(items)))
        log.debug("warmed up over batch sizes %s", batch_sizes)

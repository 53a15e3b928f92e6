"""``compose(cfg) -> HydraServer``: the one place where the chosen plugins meet.

Validation happens first and reports every problem at once; nothing is loaded in this process
(models load inside the spawned workers).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from framework import metrics
from framework.config import Resolved, validate


def compose(cfg: DictConfig | dict | Resolved, output_dir: str | None = None):
    """Validate ``cfg`` and build the server (not started). Raises ``ConfigError``."""
    from framework.server import HydraServer

    resolved = cfg if isinstance(cfg, Resolved) else validate(cfg)
    metrics.init_metrics_dir()  # before any API process forks or worker spawns
    return HydraServer(resolved, os.path.abspath(output_dir or os.getcwd()))

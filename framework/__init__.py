"""hydraserve's public API: what a plugin may import.

Plugins import only from here; ``framework`` never imports a concrete plugin except through
``framework.registry``.
"""

from framework.errors import ConfigError, ConfigProblem, PluginLoadError, RequestError
from framework.plugin import (
    KINDS,
    BatchDecision,
    BatchingPlugin,
    CacheHit,
    CachePlugin,
    CacheRequest,
    CheckContext,
    EmptyConfig,
    GenerativeModelPlugin,
    HardwareInfo,
    HardwarePlugin,
    ModelPlugin,
    Plugin,
    QuantizationPlugin,
)

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "BatchDecision",
    "BatchingPlugin",
    "CacheHit",
    "CachePlugin",
    "CacheRequest",
    "CheckContext",
    "ConfigError",
    "ConfigProblem",
    "EmptyConfig",
    "GenerativeModelPlugin",
    "HardwareInfo",
    "HardwarePlugin",
    "ModelPlugin",
    "Plugin",
    "PluginLoadError",
    "QuantizationPlugin",
    "RequestError",
    "__version__",
]

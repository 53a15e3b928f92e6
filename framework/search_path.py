"""Config search paths contributed by installed plugin packages.

A package that adds plugins may ship their YAML options (``<its module>/conf/<group>/<name>.yaml``)
and declare the folder under the entry-point group ``hydraserve.conf``; ``hydraserve`` appends each
such package to Hydra's search path, so ``model=<its plugin>`` works without editing ``conf/``.
"""

from __future__ import annotations

import importlib.metadata

GROUP = "hydraserve.conf"


def plugin_config_packages() -> list[str]:
    return sorted({ep.value for ep in importlib.metadata.entry_points(group=GROUP)})


def plugin_search_path_overrides() -> list[str]:
    packages = plugin_config_packages()
    if not packages:
        return []
    paths = ",".join(f"pkg://{p}" for p in packages)
    return [f"hydra.searchpath=[{paths}]"]

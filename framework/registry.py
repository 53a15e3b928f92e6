"""(kind, name) -> plugin class.

Built-ins are discovered from the file layout (``plugins/<kind>/<name>.py`` exposing ``PLUGIN``), so
adding a built-in never edits a central list; installed packages add plugins through entry-point
groups ``hydraserve.<kind>``. Everything is imported lazily (a plugin module is imported only when
the config asks for it) and entry points are read once per process (vLLM's ``plugins`` pattern).
A name clash between a built-in and an installed plugin is an error, never a silent override.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import threading
from dataclasses import dataclass

from framework.errors import PluginLoadError
from framework.plugin import KINDS, Plugin

ENTRY_POINT_PREFIX = "hydraserve."


@dataclass(frozen=True)
class PluginSource:
    kind: str
    name: str
    target: str  # "module:attr"
    origin: str  # "built-in" or "<distribution> <version>"


_lock = threading.Lock()
_sources: dict[str, dict[str, PluginSource]] | None = None
_clashes: list[str] = []
_loaded: dict[tuple[str, str], type[Plugin]] = {}


def _builtin_sources(kind: str) -> dict[str, PluginSource]:
    package = importlib.import_module(f"plugins.{kind}")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        found[info.name] = PluginSource(kind, info.name, f"plugins.{kind}.{info.name}:PLUGIN", "built-in")
    return found


def _entry_point_sources(kind: str) -> list[PluginSource]:
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_PREFIX + kind):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "installed package"
        found.append(PluginSource(kind, ep.name, ep.value, origin))
    return found


def _discover() -> dict[str, dict[str, PluginSource]]:
    global _sources
    with _lock:
        if _sources is None:
            sources: dict[str, dict[str, PluginSource]] = {}
            for kind in KINDS:
                table = _builtin_sources(kind)
                for src in _entry_point_sources(kind):
                    if src.name in table:
                        _clashes.append(
                            f"{kind}: plugin '{src.name}' from {src.origin} clashes with the "
                            f"{table[src.name].origin} one; rename it in that package's entry points"
                        )
                        continue
                    table[src.name] = src
                sources[kind] = table
            _sources = sources
        return _sources


def reset() -> None:
    """Forget discovered plugins (tests install packages at run time)."""
    global _sources
    with _lock:
        _sources = None
        _clashes.clear()
        _loaded.clear()
    importlib.invalidate_caches()


def clashes() -> list[str]:
    _discover()
    return list(_clashes)


def names(kind: str) -> list[str]:
    return sorted(_discover()[kind])


def sources(kind: str) -> list[PluginSource]:
    table = _discover()[kind]
    return [table[n] for n in sorted(table)]


def get(kind: str, name: str) -> type[Plugin]:
    """The plugin class for (kind, name); raises ``KeyError`` (unknown) or ``PluginLoadError``."""
    if kind not in KINDS:
        raise KeyError(f"unknown plugin kind '{kind}'; kinds are {', '.join(KINDS)}")
    key = (kind, name)
    if key in _loaded:
        return _loaded[key]
    table = _discover()[kind]
    if name not in table:
        raise KeyError(name)
    src = table[name]
    module_name, _, attr = src.target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in (attr or "PLUGIN").split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # a broken plugin the config asks for is a loud error
        raise PluginLoadError(f"{kind} plugin '{name}' from {src.origin} failed to load ({src.target}): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Plugin) and obj.kind == kind):
        raise PluginLoadError(f"{kind} plugin '{name}' from {src.origin} ({src.target}) is not a "
                              f"subclass of the framework's {kind} plugin base class")
    _loaded[key] = obj
    return obj

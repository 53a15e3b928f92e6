"""Where each chosen plugin comes from, and the versions of the libraries the answer depends on."""

from __future__ import annotations

import importlib.metadata

from framework import registry
from framework.config import Resolved
from framework.plugin import KINDS

LIBRARIES = ("litserve", "torch", "torchao", "transformers", "hydra-core", "opentelemetry-sdk")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_versions(resolved: Resolved) -> dict:
    names = resolved.names()
    out = {}
    for kind in KINDS:
        source = next((s for s in registry.sources(kind) if s.name == names[kind]), None)
        out[kind] = {"name": names[kind], "origin": source.origin if source else "unknown"}
    out["libraries"] = {lib: _version(lib) for lib in LIBRARIES}
    return out

"""Compose the Hydra config and validate it into plugin instances, reporting every error at once.

Each plugin group node is ``{name: <plugin>, **params}``; ``params`` are merged key by key into the
plugin's ``Config`` dataclass so that one bad key does not hide the next one. A ``Config`` may add
semantic checks with ``problems() -> [(field, message)]``, and a plugin may add cross-plugin checks
(e.g. a quantization scheme the hardware cannot run) with ``Plugin.check``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework import registry
from framework.errors import ConfigError, ConfigProblem, PluginLoadError
from framework.plugin import (
    KINDS,
    BatchingPlugin,
    CachePlugin,
    CheckContext,
    HardwarePlugin,
    ModelPlugin,
    Plugin,
    QuantizationPlugin,
)
from framework.settings import ServerConfig, TracingConfig

FRAMEWORK_GROUPS: dict[str, type] = {"server": ServerConfig, "tracing": TracingConfig}


def conf_dir() -> Path:
    """The packaged config folder: ``conf/`` in a checkout, ``hydraserve_conf`` when installed."""
    here = Path(__file__).resolve().parent.parent / "conf"
    if (here / "serve.yaml").is_file():
        return here
    import importlib.resources

    return Path(str(importlib.resources.files("hydraserve_conf")))


def compose(overrides: list[str] | None = None, config_name: str = "serve") -> DictConfig:
    """Compose a config the way the CLI does (for tests, benchmarks and the bench driver)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from framework.search_path import plugin_search_path_overrides

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name,
                             overrides=[*plugin_search_path_overrides(), *(overrides or [])])


@dataclass
class Resolved:
    """A validated config: plugin instances (configured, nothing loaded) and framework settings."""

    model: ModelPlugin
    quantization: QuantizationPlugin
    batching: BatchingPlugin
    cache: CachePlugin
    hardware: HardwarePlugin
    server: ServerConfig
    tracing: TracingConfig
    raw: dict  # the composed config as plain data, for /info

    def plugin(self, kind: str) -> Plugin:
        return getattr(self, kind)

    def names(self) -> dict[str, str]:
        return {kind: self.raw[kind]["name"] for kind in KINDS}

    def resource_attributes(self) -> dict[str, str]:
        """The chosen plugins as OpenTelemetry resource attributes (``hydraserve.model: minilm``...),
        the same in every process of the server: each derives them from this config."""
        return {f"hydraserve.{kind}": name for kind, name in self.names().items()}


def _merge_into_dataclass(
    schema: type, params: dict, prefix: str, problems: list[ConfigProblem]
) -> Any | None:
    base = OmegaConf.structured(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key, value in params.items():
        full = f"{prefix}.{key}"
        if key not in fields:
            hint = ", ".join(sorted(fields)) or "(none)"
            problems.append(ConfigProblem(full, f"unknown key; valid keys are {hint}"))
            continue
        try:
            # Merging into a null field (an Optional dict unset) fails inside OmegaConf: set it instead.
            OmegaConf.update(base, key, value, merge=not base._get_node(key)._is_none())
        except OmegaConfBaseException as exc:
            expected = next(f.type for f in dataclasses.fields(schema) if f.name == key)
            expected = getattr(expected, "__name__", str(expected))
            problems.append(ConfigProblem(full, f"expected {expected}, got {value!r} ({_short(exc)})"))
    missing = sorted(OmegaConf.missing_keys(base))
    for key in missing:
        problems.append(ConfigProblem(f"{prefix}.{key}", "missing required value; set it in the YAML "
                                      f"or on the command line ({prefix}.{key}=...)"))
    if missing:
        return None
    try:
        obj = OmegaConf.to_object(base)
    except OmegaConfBaseException as exc:
        problems.append(ConfigProblem(prefix, _short(exc)))
        return None
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(ConfigProblem(f"{prefix}.{k}", m) for k, m in check())
    return obj


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0]


def _plain(node: Any) -> dict:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node or {})


def validate(cfg: DictConfig | dict) -> Resolved:
    """Turn a composed config into a ``Resolved``; raise ``ConfigError`` listing every problem."""
    problems: list[ConfigProblem] = []
    try:
        raw = _plain(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError([ConfigProblem("(config)", _short(exc))]) from exc
    built: dict[str, Any] = {}

    for kind in KINDS:
        node = raw.get(kind)
        if not isinstance(node, dict) or "name" not in node:
            problems.append(ConfigProblem(kind, f"missing; choose one with {kind}=<name> "
                                          f"(available: {', '.join(registry.names(kind))})"))
            continue
        params = dict(node)
        name = str(params.pop("name"))
        try:
            cls = registry.get(kind, name)
        except KeyError:
            problems.append(ConfigProblem(kind, f"unknown plugin '{name}' for group '{kind}'; "
                                          f"available: {', '.join(registry.names(kind))}"))
            continue
        except PluginLoadError as exc:
            problems.append(ConfigProblem(kind, str(exc)))
            continue
        conf = _merge_into_dataclass(cls.Config, params, kind, problems)
        if conf is not None:
            built[kind] = cls(conf)

    for group, schema in FRAMEWORK_GROUPS.items():
        node = raw.get(group, {}) or {}
        built[group] = _merge_into_dataclass(schema, dict(node), group, problems)

    for msg in registry.clashes():
        problems.append(ConfigProblem("plugins", msg))

    if all(kind in built for kind in KINDS):
        ctx = CheckContext(**{kind: built[kind] for kind in KINDS})
        for kind in KINDS:
            try:
                found = built[kind].check(ctx)
            except Exception as exc:  # a check that crashes is still reported, with the others
                found = [f"check failed: {type(exc).__name__}: {exc}"]
            problems.extend(_check_problem(kind, m) for m in found)

    if problems:
        raise ConfigError(problems)
    return Resolved(raw=raw, **built)


def _check_problem(kind: str, message: str) -> ConfigProblem:
    # A check may name its field as "field: message"; the key becomes "<kind>.<field>".
    head, sep, rest = message.partition(": ")
    if sep and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return ConfigProblem(f"{kind}.{head}", rest)
    return ConfigProblem(kind, message)

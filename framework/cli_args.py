"""The argument list ``hydraserve serve|validate|bench`` hands to Hydra, checked before Hydra runs.

Two jobs, both before Hydra composes or runs anything:

* **Order.** Hydra's parser takes its overrides as one positional list, so ``own overrides, then the
  user's words`` broke as soon as a flag came after an override (``validate --cfg job model=echo``,
  ``bench -m ...`` with a plugin package's search path in front). Flags go first, then every override.
* **Safety.** Some ``hydra.*`` keys make Hydra import and call code named on the command line:
  ``hydra.callbacks.*._target_`` (instantiated at start-up), nested ``_target_`` nodes under
  ``hydra.launcher``/``hydra.sweeper`` (instantiated with the plugin), ``()`` factories in
  ``hydra.job_logging``/``hydra.hydra_logging`` (``logging.config.dictConfig``), ``hydra.job.env_set``
  (``LD_PRELOAD``, ``PYTHONPATH`` for every spawned worker), ``hydra.searchpath`` and ``--config-dir``
  (configs from anywhere, callbacks included) and ``--experimental-rerun`` (loads a pickle). Only the
  ``hydra.*`` keys and groups below may be set; every other top-level key must be a config group.
"""

from __future__ import annotations

import re

from framework.plugin import KINDS

# Hydra flags that only choose what to print or how to run, with how many values each takes
# ("?": one optional value, taken only when it is one of INFO_CHOICES).
FLAGS: dict[str, int | str] = {
    "-m": 0, "--multirun": 0, "-r": 0, "--run": 0, "--cfg": 1, "-c": 1, "--resolve": 0, "--package": 1, "-p": 1,
    "--info": "?", "-i": "?", "--help": 0, "-h": 0, "--hydra-help": 0, "--version": 0,
}
MODE_FLAGS = {"-m": "multirun", "--multirun": "multirun", "-r": "run", "--run": "run", "--cfg": "cfg", "-c": "cfg",
              "--info": "info", "-i": "info"}
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
REFUSED_FLAGS = {
    "--config-path": "the primary config is fixed per command", "-cp": "the primary config is fixed per command",
    "--config-name": "the primary config is fixed per command", "-cn": "the primary config is fixed per command",
    "--config-dir": "it adds configs from anywhere to the search path (install a plugin package instead)",
    "-cd": "it adds configs from anywhere to the search path (install a plugin package instead)",
    "--experimental-rerun": "it loads a pickle, which can run any code",
    "--shell-completion": "not supported by hydraserve", "-sc": "not supported by hydraserve",
}
# hydra.* keys that only name folders, names and help text (nothing Hydra imports or calls).
HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.output_subdir", "hydra.job.chdir",
              "hydra.job.name", "hydra.job.config.override_dirname", "hydra.verbose", "hydra.mode", "hydra.help",
              "hydra.hydra_help")
HYDRA_LOG_LEVEL = re.compile(r"hydra\.(job|hydra)_logging\.(root|loggers\.\w+)\.level")
# hydra/<group> options shipped with Hydra itself that only configure logging or the basic runner.
HYDRA_GROUPS = {
    "hydra/job_logging": ("default", "disabled", "none", "stdout"),
    "hydra/hydra_logging": ("default", "disabled", "none", "hydra_debug"),
    "hydra/launcher": ("basic",),
    "hydra/sweeper": ("basic",),
}


class CommandLineError(ValueError):
    """Refused arguments: the message names each one, why, and what to do instead."""


def top_level_keys(command: str) -> tuple[str, ...]:
    from framework.config import FRAMEWORK_GROUPS

    return (*KINDS, *FRAMEWORK_GROUPS, "experiment", *(("bench",) if command == "bench" else ()))


def split_flags(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``(flags, overrides, problems)``: Hydra flags (with their values) apart from overrides."""
    flags: list[str] = []
    overrides: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("-") or word == "-":
            overrides.append(word)
            continue
        name, eq, _ = word.partition("=") if word.startswith("--") else (word, "", "")
        if name in REFUSED_FLAGS:
            value = ""
            if not eq and name not in ("--shell-completion", "-sc") and i < len(argv):
                value, i = f" {argv[i]}", i + 1  # its value goes with it, not among the overrides
            problems.append(f"'{word}{value}': refused: {REFUSED_FLAGS[name]}")
            continue
        if name not in FLAGS:
            problems.append(f"'{word}': unknown flag; hydraserve passes these Hydra flags on: "
                            f"{', '.join(f for f in FLAGS if f.startswith('--'))}")
            continue
        flags.append(word)
        takes = FLAGS[name]
        if eq:
            continue
        if takes == 1 and i < len(argv):
            flags.append(argv[i])
            i += 1
        elif takes == "?" and i < len(argv) and argv[i] in INFO_CHOICES:
            flags.append(argv[i])
            i += 1
    modes = [f.partition("=")[0] for f in flags if f.partition("=")[0] in MODE_FLAGS]
    if len({MODE_FLAGS[f] for f in modes}) > 1:
        problems.append(f"'{' '.join(modes)}': Hydra takes only one of --run, --multirun, --cfg and --info")
    return flags, overrides, problems


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def override_problems(command: str, overrides: list[str]) -> list[str]:
    """Why each refused override is refused (empty: all may go to Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    known = top_level_keys(command)
    problems: list[str] = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            problems.append(f"'{text}': not an override Hydra can read: {str(exc).splitlines()[0]}")
            continue
        key = override.key_or_group.lstrip("/")
        why = _key_problem(key, known)
        if why is None and override.package:
            package = override.package
            if package.split(".")[0] not in known:
                why = (f"a config may only be placed (@{package}) under one of the top-level keys "
                       f"{', '.join(known)}")
        if why is None and key in HYDRA_GROUPS:
            choices = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                       else [override.get_value_element_as_str()] if override.value() is not None else [])
            bad = [c for c in choices if c not in HYDRA_GROUPS[key]]
            if bad:
                why = f"{key} may only be {', '.join(HYDRA_GROUPS[key])} here (got {', '.join(bad)})"
        if why is not None:
            problems.append(f"'{text}': {why}")
    return problems


def _key_problem(key: str, known: tuple[str, ...]) -> str | None:
    top = re.split(r"[./]", key, maxsplit=1)[0]
    if top != "hydra":
        if top in known:
            return None
        return f"unknown top-level key '{top}'; the config has {', '.join(known)} (and hydra)"
    if key in HYDRA_GROUPS:
        return None
    if any(_under(key, allowed) for allowed in HYDRA_KEYS) or HYDRA_LOG_LEVEL.fullmatch(key):
        return None
    if _under(key, "hydra.callbacks"):
        return "hydra.callbacks makes Hydra import and call the code it names (_target_)"
    return (f"{key} is not one of the hydra settings hydraserve passes on ({', '.join(HYDRA_KEYS)}, "
            f"hydra.job_logging.root.level, {', '.join(f'{g}=' + '|'.join(c) for g, c in HYDRA_GROUPS.items())})")


def hydra_argv(command: str, argv: list[str], own: list[str] | None = None) -> list[str]:
    """``sys.argv`` for Hydra: ``hydraserve <command>``, the user's flags, then the search path of
    installed plugin packages, ``own`` overrides and the user's. Raises ``CommandLineError``."""
    from framework.search_path import plugin_search_path_overrides

    flags, overrides, problems = split_flags(argv)
    problems += override_problems(command, overrides)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise CommandLineError(
            f"hydraserve {command}: refused {len(problems)} argument(s); nothing was run:\n{lines}\n"
            "Fix: drop them. Set plugin options under their group (model.path=..., cache.directory=...), "
            "server.* or tracing.*; choose options with <group>=<name>; add plugins by installing a "
            "package (see examples/custom_plugin).")
    return [f"hydraserve {command}", *flags, *plugin_search_path_overrides(), *(own or []), *overrides]

"""`serve`, `validate`, `bench`: Hydra flags in any position, and no code run from the command line.

Hydra imports and calls what some ``hydra.*`` keys name (``hydra.callbacks.*._target_`` at start-up,
nested ``_target_`` under the launcher or sweeper, ``()`` factories in the logging config), so those
overrides, and any unknown top-level key, are refused before Hydra runs anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework import cli
from framework.cli_args import hydra_argv, override_problems, split_flags

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_plugin"


def hydraserve(*args: str, cwd: Path, pythonpath: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), pythonpath) if p)}
    return subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


# ------------------------------------------------------------------------------- code from overrides


def test_a_hydra_callback_on_the_command_line_runs_nothing(tmp_path):
    target = tmp_path / "created-by-a-callback"
    result = hydraserve("validate", "+hydra.callbacks.e._target_=pathlib.Path.touch",
                        f"+hydra.callbacks.e._args_=[{target}]", "model=echo", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not target.exists()
    assert "hydraserve validate: refused 2 argument(s); nothing was run" in result.stderr
    assert "'+hydra.callbacks.e._target_=pathlib.Path.touch': hydra.callbacks makes Hydra import" in result.stderr
    assert "Fix: drop them." in result.stderr
    assert "Config is well-formed" not in result.stdout
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("command", ["serve", "validate", "bench"])
@pytest.mark.parametrize("words, named", [
    (["+hydra.callbacks.e._target_=os.system"], "hydra.callbacks makes Hydra import"),
    (["~hydra.callbacks.sweep_report"], "hydra.callbacks makes Hydra import"),
    (["+hydra.launcher.x._target_=os.system"], "hydra.launcher.x._target_ is not one of the hydra settings"),
    (["+hydra.sweeper.x._target_=os.system"], "hydra.sweeper.x._target_ is not one of the hydra settings"),
    (["+hydra.job.env_set.LD_PRELOAD=/tmp/x.so"], "hydra.job.env_set.LD_PRELOAD is not one of"),
    (["+hydra.job_logging.handlers.x={class: logging.FileHandler}"], "hydra.job_logging.handlers.x is not one of"),
    (["hydra={callbacks: {}}"], "'hydra={callbacks: {}}': hydra is not one of"),
    (["hydra.searchpath=[file:///tmp]"], "hydra.searchpath is not one of"),
    (["hydra/launcher=joblib"], "hydra/launcher may only be basic here (got joblib)"),
    (["hydra/sweeper=basic,optuna"], "hydra/sweeper may only be basic here (got optuna)"),
    (["+model@hydra.callbacks.x=echo"], "a config may only be placed (@hydra.callbacks.x)"),
    (["+colour=red"], "unknown top-level key 'colour'"),
    (["-cd", "/tmp"], "'-cd /tmp': refused: it adds configs from anywhere"),
    (["--experimental-rerun", "x.pickle"], "'--experimental-rerun x.pickle': refused: it loads a pickle"),
    (["--config-name=other"], "'--config-name=other': refused"),
    (["--bogus"], "'--bogus': unknown flag"),
])
def test_overrides_that_run_code_or_name_no_config_key_are_refused(command, words, named, capsys):
    code = cli.main([command, "model=echo", *words, "hydra.run.dir=/nonexistent/never-made"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"hydraserve {command}: refused 1 argument(s); nothing was run" in err
    assert named in err, err


@pytest.mark.parametrize("command, overrides", [
    ("validate", ["model=echo", "batching=none,dynamic", "+model.colour=red", "~experiment", "server.port=1"]),
    ("serve", ["experiment=cpu_low_latency", "hydra.run.dir=out", "hydra.sweep.dir=m", "hydra.sweep.subdir=x",
               "hydra.output_subdir=null", "hydra.job.chdir=false", "hydra.verbose=true", "hydra/launcher=basic",
               "hydra/job_logging=none", "hydra/hydra_logging=disabled", "hydra.job_logging.root.level=DEBUG",
               "tracing.headers={authorization: x}"]),
    ("bench", ["bench=quick", "bench.recommend=true", "quantization=none,int8_dynamic"]),
])
def test_ordinary_overrides_pass(command, overrides):
    assert override_problems(command, overrides) == []


# ----------------------------------------------------------------------------- flags in any position


def test_flags_go_before_every_override_whatever_their_position(monkeypatch):
    from hydra._internal.utils import get_args_parser

    monkeypatch.setattr("framework.search_path.plugin_search_path_overrides",
                        lambda: ["hydra.searchpath=[pkg://some_plugin.conf]"])
    argv = hydra_argv("bench", ["bench=quick", "-m", "model=echo", "batching=none,dynamic"])
    assert argv == ["hydraserve bench", "-m", "hydra.searchpath=[pkg://some_plugin.conf]", "bench=quick",
                    "model=echo", "batching=none,dynamic"]
    args = get_args_parser().parse_args(argv[1:])  # what Hydra does with it: no "unrecognized arguments"
    assert args.multirun and args.overrides == argv[2:]

    argv = hydra_argv("validate", ["model=echo", "--cfg", "job", "--resolve", "-p", "model", "batching=none"],
                      ["hydra.run.dir=."])
    assert argv == ["hydraserve validate", "--cfg", "job", "--resolve", "-p", "model",
                    "hydra.searchpath=[pkg://some_plugin.conf]", "hydra.run.dir=.", "model=echo", "batching=none"]
    args = get_args_parser().parse_args(argv[1:])
    assert (args.cfg, args.resolve, args.package) == ("job", True, "model")


@pytest.mark.parametrize("words, flags", [
    (["--info", "model=echo"], ["--info"]),  # an optional value is taken only when it is one
    (["--info", "searchpath", "model=echo"], ["--info", "searchpath"]),
    (["model=echo", "--cfg=hydra", "--resolve"], ["--cfg=hydra", "--resolve"]),
    (["-c", "all", "model=echo", "--help"], ["-c", "all", "--help"]),
])
def test_split_flags(words, flags):
    got_flags, overrides, problems = split_flags(words)
    assert (got_flags, overrides, problems) == (flags, ["model=echo"], [])


def test_validate_cfg_job_before_the_overrides_prints_the_job_config(tmp_path):
    result = hydraserve("validate", "--cfg", "job", "model=echo", "batching=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model:\n  name: echo" in result.stdout and "batching:\n  name: none" in result.stdout
    assert "hydra:" not in result.stdout
    assert os.listdir(tmp_path) == []


def test_validate_multirun_checks_every_job_and_writes_nothing(tmp_path):
    result = hydraserve("validate", "-m", "model=echo", "batching=none,dynamic", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["#0 model=echo batching=none: Config is well-formed",
                                          "#1 model=echo batching=dynamic: Config is well-formed"]
    assert os.listdir(tmp_path) == []  # no multirun/ folder, no multirun.yaml


def test_validate_multirun_fails_when_one_job_is_not_well_formed(tmp_path):
    result = hydraserve("validate", "model=echo,tiny", "--multirun", cwd=tmp_path)
    assert result.returncode == 2
    assert "#0 model=echo: Config is well-formed" in result.stdout
    assert "#1 model=tiny: Config is not well-formed (1 error)" in result.stderr
    assert "model.path: missing required value" in result.stderr


def test_hydra_errors_name_the_subcommand_that_was_run(tmp_path):
    result = hydraserve("validate", "model=echo", "--cfg", "jobx", cwd=tmp_path)
    assert result.returncode != 0
    assert "hydraserve validate: error: argument --cfg/-c: invalid choice: 'jobx'" in result.stderr
    assert "hydraserve serve" not in result.stderr


@pytest.fixture(scope="module")
def plugin_site(example_plugin_site: Path) -> Path:
    """The example plugin installed (conftest), so its `hydraserve.conf` entry point puts a
    `hydra.searchpath` override in front of the user's words."""
    return example_plugin_site


def test_multirun_with_a_plugin_package_installed(tmp_path, plugin_site):
    result = hydraserve("validate", "-m", "model=reverse", "batching=none,dynamic", cwd=tmp_path,
                        pythonpath=str(plugin_site))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["#0 model=reverse batching=none: Config is well-formed",
                                          "#1 model=reverse batching=dynamic: Config is well-formed"]
    result = hydraserve("bench", "model=reverse", "bench=quick", "--cfg", "job", "-p", "model", cwd=tmp_path,
                        pythonpath=str(plugin_site))
    assert result.returncode == 0, result.stderr
    assert "name: reverse" in result.stdout

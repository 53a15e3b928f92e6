"""`pip install .` ships the configs and every package, so `hydraserve` works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(ROOT)], check=True, timeout=300, cwd=out)
    return next(out.glob("hydraserve-*.whl"))


def test_wheel_has_every_package_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in list(ROOT.glob("framework/**/__init__.py")) + list(ROOT.glob("plugins/**/__init__.py")):
        assert str(init.relative_to(ROOT)) in names, f"{init.relative_to(ROOT)} missing: add it to pyproject's packages"
    for yaml in ROOT.glob("conf/**/*.yaml"):
        packaged = "hydraserve_conf/" + str(yaml.relative_to(ROOT / "conf"))
        assert packaged in names, f"{packaged} missing from the wheel"


def test_installed_cli_runs_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    script = ("import sys, framework, framework.config, framework.cli; "
              "assert framework.__file__.startswith(sys.argv[1]), framework.__file__; "
              "assert 'hydraserve_conf' in str(framework.config.conf_dir()), framework.config.conf_dir(); "
              "sys.exit(framework.cli.main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", script, str(site), "validate", "model=echo"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Config is well-formed" in result.stdout

"""The `hydraserve` command: validate, plugins, errors before any process starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hydraserve(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "framework.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


def test_validate_good_config():
    result = hydraserve("validate", "model=echo")
    assert result.returncode == 0, result.stderr
    assert "Config is well-formed" in result.stdout


def test_validate_lists_every_error(tmp_path):
    result = hydraserve("validate", "model=hf_embedding", f"model.path={tmp_path}/missing",
                        "server.max_queue=0", "+batching.colour=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Config is not well-formed (3 errors)" in result.stderr
    assert "model.path: no such model folder" in result.stderr
    assert "server.max_queue: must be > 0" in result.stderr
    assert "batching.colour: unknown key" in result.stderr
    assert not (tmp_path / "outputs").exists()  # validate writes nothing


def test_serve_refuses_bad_config_before_starting(tmp_path):
    result = hydraserve("serve", "model=tiny", f"hydra.run.dir={tmp_path}", timeout=60)
    assert result.returncode == 2
    assert "model.path: missing required value" in result.stderr


def test_cfg_job_prints_the_composed_config():
    result = hydraserve("validate", "model=echo", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: echo" in result.stdout


def test_plugins_lists_every_kind_with_origin():
    result = hydraserve("plugins")
    assert result.returncode == 0, result.stderr
    for kind in ("model:", "quantization:", "batching:", "cache:", "hardware:"):
        assert kind in result.stdout
    assert "minilm" in result.stdout and "built-in" in result.stdout


def test_cli_works_from_another_directory(tmp_path):
    result = hydraserve("validate", "model=echo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_serve_refuses_to_start_below_the_quality_floor(tmp_path, tiny_dir):
    """A quantized model below quantization.min_quality never serves: the worker's reason is printed."""
    result = hydraserve("serve", "model=tiny", f"model.path={tiny_dir}", "quantization=int8_dynamic",
                        "hardware.compile=off", "quantization.allow_slow=true", "quantization.min_quality=0.99999999",
                        "cache=none", "tracing=none", f"hydra.run.dir={tmp_path}", "server.port=18765",
                        cwd=tmp_path, timeout=240)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "quality gate failed for quantization=int8_dynamic" in result.stderr
    assert "quantization.min_quality=0.99999999" in result.stderr

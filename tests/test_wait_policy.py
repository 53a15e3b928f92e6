"""hardware.spin_wait and hardware.spin_count reach the inference workers' OpenMP (their environment at
start, which libgomp reads once), and a bad count is refused before any process starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from framework.config import compose, validate
from framework.errors import ConfigError


def _clean_environment(monkeypatch) -> None:
    """No wait variables, and each restored as it was after the test (setenv records the old state)."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "HYDRASERVE_OPENMP_SET"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _worker_pid(server) -> int:
    return httpx.get(f"{server.url}/info", timeout=30).json()["engine"][0]["pid"]


def _worker_environment(server) -> dict[str, str]:
    raw = Path(f"/proc/{_worker_pid(server)}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.parametrize(("overrides", "policy", "count"), [
    ([], "PASSIVE", "0"),                                      # the shipped default (one-shot): sleep at once
    (["hardware.spin_count=30000"], "PASSIVE", "30000"),       # a short bounded spin (a box of its own)
    (["hardware.spin_wait=true"], "ACTIVE", None),             # spin without bound: the count would cap it
], ids=["default", "bounded", "spin_wait"])
def test_the_worker_starts_with_the_configured_openmp_wait(serve, tiny_dir, monkeypatch, overrides, policy, count):
    _clean_environment(monkeypatch)
    server = serve(["model=tiny", f"model.path={tiny_dir}", "cache=none", "tracing=none", *overrides])
    env = _worker_environment(server)
    assert env.get("OMP_WAIT_POLICY") == policy
    assert env.get("GOMP_SPINCOUNT") == count


@pytest.mark.parametrize(("overrides", "count"), [
    ([], "300000"),                          # null: a ~3 ms spin bridges decode's many small parallel regions
    (["hardware.spin_count=0"], "0"),        # an explicit count wins over the model's kind
], ids=["default", "explicit_count"])
def test_a_generative_model_spins_briefly_by_default(serve, tiny_chat_dir, monkeypatch, overrides, count):
    _clean_environment(monkeypatch)
    server = serve(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "model.served_name=tiny_chat",
                    "cache=none", "tracing=none", *overrides])
    env = _worker_environment(server)
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE" and env.get("GOMP_SPINCOUNT") == count
    # The spin is bounded: once the server is idle its threads sleep (OMP_WAIT_POLICY=ACTIVE kept a core busy).
    pid = _worker_pid(server)
    body = {"model": "tiny_chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    time.sleep(0.5)
    before = _cpu_seconds(pid)
    time.sleep(2.0)
    assert _cpu_seconds(pid) - before < 0.5  # spinning without bound: 2.0 s of a core


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_count_the_user_exported_wins(serve, tiny_dir, monkeypatch):
    _clean_environment(monkeypatch)
    monkeypatch.setenv("GOMP_SPINCOUNT", "777")
    server = serve(["model=tiny", f"model.path={tiny_dir}", "cache=none", "tracing=none"])
    assert _worker_environment(server)["GOMP_SPINCOUNT"] == "777"


def test_a_negative_count_is_refused_naming_the_field(tiny_dir):
    with pytest.raises(ConfigError, match=r"hardware\.spin_count: must be >= 0 or null"):
        validate(compose(["model=tiny", f"model.path={tiny_dir}", "hardware.spin_count=-5"]))


def test_a_setting_inherited_from_an_earlier_validate_does_not_win(serve, tiny_dir, monkeypatch):
    # The bench and the tests validate configs in their own process (which sets the variables for the
    # workers it would spawn), then start servers with other configs: those must run their own setting.
    _clean_environment(monkeypatch)
    import plugins.hardware._base as base

    monkeypatch.setattr(base, "_USER_WAIT_POLICY", None)
    monkeypatch.setattr(base, "_USER_SPIN_COUNT", None)
    validate(compose(["model=tiny", f"model.path={tiny_dir}", "hardware.spin_count=1234"]))
    assert base.os.environ["GOMP_SPINCOUNT"] == "1234"
    server = serve(["model=tiny", f"model.path={tiny_dir}", "cache=none", "tracing=none", "hardware.spin_wait=true"])
    env = _worker_environment(server)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in env

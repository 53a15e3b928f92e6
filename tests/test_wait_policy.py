"""hardware.spin_wait and hardware.spin_count reach the inference workers' OpenMP (their environment at
start, which libgomp reads once), and a bad count is refused before any process starts."""

from __future__ import annotations

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


def _worker_environment(server) -> dict[str, str]:
    pid = httpx.get(f"{server.url}/info", timeout=30).json()["engine"][0]["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.parametrize(("overrides", "policy", "count"), [
    ([], "PASSIVE", "0"),                                      # the shipped default (one-shot): sleep at once
    (["hardware.spin_count=30000"], "PASSIVE", "30000"),       # a short bounded spin (a box of its own)
    (["hardware.spin_count=null"], "PASSIVE", None),           # libgomp's own count (0 when passive)
    (["hardware.spin_wait=true"], "ACTIVE", None),             # spin without bound: the count would cap it
], ids=["default", "bounded", "null", "spin_wait"])
def test_the_worker_starts_with_the_configured_openmp_wait(serve, tiny_dir, monkeypatch, overrides, policy, count):
    _clean_environment(monkeypatch)
    server = serve(["model=tiny", f"model.path={tiny_dir}", "cache=none", "tracing=none", *overrides])
    env = _worker_environment(server)
    assert env.get("OMP_WAIT_POLICY") == policy
    assert env.get("GOMP_SPINCOUNT") == count


@pytest.mark.parametrize(("overrides", "policy"), [
    ([], "ACTIVE"),                          # null: decode's many small parallel regions spin
    (["hardware.spin_wait=false"], "PASSIVE"),  # an explicit setting wins over the model's kind
], ids=["default", "explicit_false"])
def test_a_generative_model_spins_by_default(serve, tiny_chat_dir, monkeypatch, overrides, policy):
    _clean_environment(monkeypatch)
    server = serve(["model=hf_causal_lm", f"model.path={tiny_chat_dir}", "cache=none", "tracing=none",
                    *overrides])
    env = _worker_environment(server)
    assert env.get("OMP_WAIT_POLICY") == policy
    assert env.get("GOMP_SPINCOUNT") == (None if policy == "ACTIVE" else "0")


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

"""An installed package adds a model plugin (and its config) without touching hydraserve.

``examples/custom_plugin`` is pip-installed into a temporary target folder put on ``sys.path`` (never
into the shared venv, so other tests keep seeing only the built-ins), then the registry is reset and
must find ``model=reverse`` through the ``hydraserve.model`` entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import framework.config
from framework import ConfigError, ModelPlugin, RequestError, registry
from framework.search_path import plugin_config_packages

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_plugin"
MODULE = "hydraserve_example_plugin"


def _forget_example_modules() -> None:
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def site_dir(example_plugin_site: Path) -> Path:
    return example_plugin_site


@pytest.fixture
def installed(site_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(site_dir))
    importlib.invalidate_caches()
    registry.reset()
    yield site_dir
    monkeypatch.undo()  # sys.path first, so the reset below forgets the example's entry points
    _forget_example_modules()
    registry.reset()


def test_installed_plugin_is_found_with_its_origin(installed: Path) -> None:
    cls = registry.get("model", "reverse")
    assert issubclass(cls, ModelPlugin)
    assert "reverse" in registry.names("model")
    source = next(s for s in registry.sources("model") if s.name == "reverse")
    assert source.origin.replace("_", "-").startswith("hydraserve-example-plugin 0.1.0")
    assert registry.clashes() == []


def test_installed_plugin_serves_requests(installed: Path) -> None:
    model = registry.get("model", "reverse")(None)
    items = model.decode({"input": ["abc", "hydra"]})
    model.load("cpu")
    outputs = model.postprocess(model.forward(model.preprocess(items)))
    assert model.encode(outputs, {}) == {"outputs": ["cba", "ardyh"]}
    with pytest.raises(RequestError) as err:
        model.decode({"input": ["ok", 3]})
    assert err.value.field == "input[1]"


def test_model_reverse_composes_without_editing_conf(installed: Path) -> None:
    """The package's conf/model/reverse.yaml joins Hydra's search path via the hydraserve.conf entry point."""
    assert f"{MODULE}.conf" in plugin_config_packages()
    resolved = framework.config.validate(framework.config.compose(["model=reverse", "model.uppercase=true"]))
    assert resolved.names()["model"] == "reverse"
    assert resolved.model.config.uppercase is True
    resolved.model.load("cpu")
    assert resolved.model.forward(["abc"]) == ["CBA"]

    with pytest.raises(ConfigError) as err:
        framework.config.validate(framework.config.compose(["model=reverse", "model.max_items=0"]))
    assert [p.key for p in err.value.problems] == ["model.max_items"]


class _FakeDist:
    name = "clashing-plugin"
    version = "9.9"


def test_entry_point_with_a_builtin_name_is_a_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get("group") == "hydraserve.model":
            ep = importlib.metadata.EntryPoint(name="echo", value="somewhere.else:Echo",
                                               group="hydraserve.model")
            # EntryPoint is immutable; the registry reads `.dist` for the origin.
            object.__setattr__(ep, "dist", _FakeDist())
            return [ep]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry.reset()
    try:
        clashes = registry.clashes()
        assert len(clashes) == 1
        assert "'echo'" in clashes[0] and "clashing-plugin 9.9" in clashes[0] and "built-in" in clashes[0]
        # The built-in still wins, and validation reports the clash instead of silently overriding.
        assert registry.get("model", "echo").__module__ == "plugins.model.echo"
        with pytest.raises(ConfigError) as err:
            framework.config.validate(framework.config.compose(["model=echo"]))
        assert any(p.key == "plugins" and "echo" in p.message for p in err.value.problems)
    finally:
        monkeypatch.undo()
        registry.reset()


def test_installed_plugin_is_served_over_http(site_dir: Path, serve) -> None:
    """`hydraserve serve model=reverse` with the package installed: a real server, real HTTP."""
    import httpx

    server = serve(["model=reverse", "cache=none", "tracing=none"], env={"PYTHONPATH": str(site_dir)})
    r = httpx.post(server.url + "/predict", json={"input": "hydraserve"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "evresardyh" in r.text.lower()
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["plugins"]["model"]["origin"].startswith("hydraserve-example-plugin")


def test_the_example_plugins_own_conformance_tests_pass(site_dir: Path) -> None:
    """What a plugin author runs: their package installed, their tests calling framework.testing."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site_dir), str(EXAMPLE.parent.parent)])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                           str(EXAMPLE), str(EXAMPLE / "tests")], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout

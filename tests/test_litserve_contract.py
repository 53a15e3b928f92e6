"""Every LitServe internal hydraserve relies on (``framework.litserve_adapter.INTERNALS``) still exists
with the parameters the adapter uses, so trying a newer LitServe fails here, naming what moved."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from pathlib import Path

import litserve as ls
import pytest
from litserve.loops.base import LitLoop

from framework.litserve_adapter import INTERNALS, LitServerAdapter


class _Echo(ls.LitAPI):
    def setup(self, device):
        pass

    def predict(self, x):
        return x


@pytest.fixture(scope="module")
def stock_server() -> ls.LitServer:
    return ls.LitServer(_Echo(), accelerator="cpu", devices=1, timeout=False)


def _params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@pytest.mark.parametrize("owner, name, params", INTERNALS, ids=[f"{o}.{n}" for o, n, _ in INTERNALS])
def test_litserve_internal_is_still_there(owner, name, params, stock_server):
    if owner == "LitServer":
        fn = getattr(ls.LitServer, name, None)
        assert fn is not None, f"LitServer.{name} is gone: framework/litserve_adapter.py overrides or calls it"
        got = _params(fn.__wrapped__ if hasattr(fn, "__wrapped__") else fn)
        assert got[:len(params)] == params, f"LitServer.{name}{got}: the adapter relies on {params}"
    elif owner == "LitLoop":
        got = _params(getattr(LitLoop, name))
        assert got[:len(params)] == params, f"LitLoop.{name}{got}: the adapter relies on {params}"
    elif owner == "instance":  # set in __init__, or (inference_workers) when run() starts the workers
        source = Path(inspect.getfile(ls.LitServer)).read_text()
        assert hasattr(stock_server, name) or f"self.{name} =" in source, \
            f"LitServer instances no longer have .{name}"
    elif owner == "app":
        # Set on each API process's app inside LitServer.run: look for it where LitServe sets it.
        source = Path(inspect.getfile(ls.LitServer)).read_text()
        assert f"app.{name}" in source or f".{name} =" in source, f"LitServer no longer sets app.{name}"
    else:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"{name} is gone"


def test_litserve_is_the_pinned_version():
    assert importlib.metadata.version("litserve") == "0.2.19", (
        "framework/litserve_adapter.py is written against litserve 0.2.19 (pinned in pyproject.toml); "
        "after an upgrade, re-read the overridden internals and update INTERNALS")


def test_the_server_touches_litserve_only_through_the_adapter():
    """No framework module but the adapter (and the stock transport and bench baselines, which are
    LitServe's own path by design) imports litserve."""
    root = Path(__file__).resolve().parent.parent / "framework"
    allowed = {"litserve_adapter.py", "api.py", "transport/stock.py", "bench/baselines.py",
               "bench/_litserve_api.py"}
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if str(p.relative_to(root)) not in allowed and "litserve" in
                 "\n".join(line for line in p.read_text().splitlines()
                           if line.lstrip().startswith(("import litserve", "from litserve")))]
    assert not offenders, f"import litserve only in framework/litserve_adapter.py: {offenders}"


def test_the_adapter_overrides_are_the_ones_listed():
    overridden = {n for n, v in vars(LitServerAdapter).items() if callable(v) and hasattr(ls.LitServer, n)}
    listed = {n for o, n, _ in INTERNALS if o == "LitServer"}
    assert overridden <= listed, f"overridden but not in INTERNALS (so untested): {overridden - listed}"

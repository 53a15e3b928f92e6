"""A conformance kit for plugin authors: one check per plugin kind, called from the plugin's own tests.

Each check exercises a plugin the way the framework will (in the API process and in the worker),
collects every way it breaks the contract, and raises ``ConformanceError`` listing them all, so a
plugin author learns what to fix before a server ever starts. The built-in plugins pass these
checks in hydraserve's own tests; ``examples/custom_plugin`` shows a third-party package using them.

Example, in a plugin package's ``tests/test_conformance.py``::

    from framework.testing import check_model_plugin
    from my_plugin.model import MyModel

    def test_my_model_conforms():
        check_model_plugin(MyModel(), good_bodies=[{"input": "hello"}], bad_bodies=[{}])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from framework.errors import RequestError
from framework.plugin import (
    KINDS,
    BatchDecision,
    BatchingPlugin,
    CacheHit,
    CachePlugin,
    CacheRequest,
    HardwareInfo,
    HardwarePlugin,
    ModelPlugin,
    Plugin,
    QuantizationPlugin,
)

__all__ = [
    "ConformanceError",
    "check_batching_plugin",
    "check_cache_plugin",
    "check_hardware_plugin",
    "check_model_plugin",
    "check_plugin",
    "check_quantization_plugin",
]


class ConformanceError(AssertionError):
    """A plugin breaks the contract; ``problems`` lists each way (the message shows them all)."""

    def __init__(self, plugin: Any, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{type(plugin).__name__} does not conform ({len(problems)} problems):\n{lines}")


class _Problems:
    """Collects problems; ``run`` records an unexpected exception as one instead of stopping."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # the point is to report it, whatever it is
            self.items.append(f"{what} raised {type(exc).__name__}: {exc}")
            return None

    def raise_for(self, plugin: Any) -> None:
        if self.items:
            raise ConformanceError(plugin, self.items)


def _json_able(value: Any) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------- any kind
def _common(plugin: Plugin, out: _Problems) -> None:
    out.expect(plugin.kind in KINDS, f"kind is {plugin.kind!r}; subclass one of the kind base classes ({KINDS})")
    cfg_cls = type(plugin).Config
    out.expect(dataclasses.is_dataclass(cfg_cls), "Config must be a dataclass (its fields are the YAML's keys)")
    out.expect(isinstance(plugin.config, cfg_cls), f"config must be a {cfg_cls.__name__}, got {plugin.config!r}")
    problems = getattr(plugin.config, "problems", None)
    if callable(problems):
        found = out.run("config.problems()", problems)
        if found is not None:
            ok = isinstance(found, list) and all(isinstance(p, tuple) and len(p) == 2 for p in found)
            out.expect(ok, f"Config.problems() must return a list of (field, message) tuples, got {found!r}")
            out.expect(not found, f"the config under test has problems: {found!r}")
    described = out.run("describe()", plugin.describe)
    out.expect(described is None or (isinstance(described, dict) and _json_able(described)),
               f"describe() must return a JSON-able dict (it is shown in /info), got {described!r}")


def check_plugin(plugin: Plugin) -> None:
    """The part of the contract every kind shares: a valid kind, a dataclass ``Config`` whose
    ``problems()`` answers (field, message) pairs, and a JSON-able ``describe()``."""
    out = _Problems()
    _common(plugin, out)
    out.raise_for(plugin)


# ------------------------------------------------------------------------------------------- model
def check_model_plugin(model: ModelPlugin, good_bodies: Iterable[dict], bad_bodies: Iterable[dict] = (),
                       device: str = "cpu", same: Callable[[Any, Any], bool] | None = None) -> None:
    """Decode, run and encode requests as the server would.

    ``good_bodies`` must decode to JSON-able items and answer with one output per item, the same
    whether an item runs alone or in a batch with the others (``same`` compares two outputs;
    default: equal after JSON encoding, or within 1e-4 for numbers). ``bad_bodies`` must be refused
    with ``RequestError`` (a 4xx), never another exception (a 500).
    """
    out = _Problems()
    _common(model, out)
    identity = out.run("identity()", model.identity)
    out.expect(identity is None or (isinstance(identity, dict) and _json_able(identity)),
               f"identity() must be a JSON-able dict (it is part of every cache key), got {identity!r}")
    again = out.run("identity() again", model.identity)
    out.expect(identity == again, "identity() must be stable: two calls differ, so no answer would ever be a hit")

    items: list[Any] = []
    bodies = list(good_bodies)
    out.expect(bool(bodies), "give at least one good request body")
    decoded: list[list[Any]] = []
    for body in bodies:
        got = out.run(f"decode({body!r})", lambda b=body: model.decode(b))
        if got is None:
            decoded.append([])
            continue
        if not isinstance(got, list) or not got:
            out.add(f"decode({body!r}) must return a non-empty list of items, got {got!r}")
            decoded.append([])
            continue
        out.expect(_json_able(got), f"decode({body!r}) items must be JSON-able (they cross the process boundary)")
        decoded.append(got)
        items.extend(got)
    for body in bad_bodies:
        try:
            model.decode(body)
            out.add(f"decode({body!r}) accepted a bad request; raise RequestError naming the field")
        except RequestError:
            pass
        except Exception as exc:
            out.add(f"decode({body!r}) raised {type(exc).__name__} (a 500); raise RequestError (a 4xx) instead")
    if out.items:
        out.raise_for(model)

    out.run(f"load({device!r})", lambda: model.load(device))
    if out.items:
        out.raise_for(model)

    def run(batch: list[Any]) -> list[Any] | None:
        outputs = out.run("preprocess/forward/postprocess",
                          lambda: model.postprocess(model.forward(model.preprocess(batch))))
        if outputs is None:
            return None
        outputs = list(outputs)
        out.expect(len(outputs) == len(batch),
                   f"postprocess returned {len(outputs)} outputs for {len(batch)} items; one per item")
        return outputs

    together = run(items)
    alone = [run([item]) for item in items]
    compare = same or _same_output
    if together is not None and len(together) == len(items):
        for i, single in enumerate(alone):
            if single and len(single) == 1 and not compare(single[0], together[i]):
                out.add(f"item {i} answers differently alone and in a batch; batching must not change answers")
        position = 0
        for body, its_items in zip(bodies, decoded, strict=True):
            outputs = together[position:position + len(its_items)]
            position += len(its_items)
            if not its_items:
                continue
            response = out.run(f"encode(..., {body!r})", lambda o=outputs, b=body: model.encode(o, b))
            out.expect(response is None or (isinstance(response, dict) and _json_able(response)),
                       f"encode must return a JSON-able dict for {body!r}, got {response!r}")
    calibration = out.run("calibration_items()", model.calibration_items)
    if calibration:
        run(list(calibration))
    out.raise_for(model)


def _same_output(a: Any, b: Any) -> bool:
    try:
        import numpy as np

        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(_same_output(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) or hasattr(a, "shape"):
            x, y = np.asarray(a), np.asarray(b)
            if x.dtype.kind in "fc" or y.dtype.kind in "fc":
                return x.shape == y.shape and bool(np.allclose(x, y, atol=1e-4, rtol=1e-4))
            return x.shape == y.shape and bool((x == y).all())
        if isinstance(a, float) or isinstance(b, float):
            return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-4)
    except (TypeError, ValueError):
        pass
    return a == b


# -------------------------------------------------------------------------------------------- cache
def check_cache_plugin(cache: CachePlugin, scope: str = "conformance-scope") -> None:
    """Open, miss, store, hit, keep scopes apart, clear and close, as every API process does.

    Call it with a plugin whose store is private to the test (a temporary folder, a fresh server).
    A cache that is ``enabled`` must serve what was stored byte for byte.
    """
    out = _Problems()
    _common(cache, out)
    out.expect(isinstance(cache.lookup_may_block, bool), "lookup_may_block must be a bool")
    out.expect(isinstance(cache.shared_across_processes, bool), "shared_across_processes must be a bool")
    out.run("open()", cache.open)
    out.raise_for(cache)
    try:
        key, body = "conformance-key-1", b'{"output": "stored \\u00e9"}'
        request = CacheRequest(key=key, texts=["a conformance text"], scope=scope)
        out.expect(out.run("get() of an unknown key", lambda: cache.get(request)) is None,
                   "get() of a key never stored must be a miss (None)")
        if cache.enabled:
            out.run("put()", lambda: cache.put(request, body))
            hit = out.run("get() after put()", lambda: cache.get(request))
            if not isinstance(hit, CacheHit):
                out.add(f"get() after put() must return a CacheHit, got {hit!r}")
            else:
                out.expect(bytes(hit.value) == body, "a hit must return the stored bytes unchanged")
            other = CacheRequest(key="conformance-key-2", texts=["a conformance text"], scope=scope + "-other")
            out.expect(out.run("get() in another scope", lambda: cache.get(other)) is None,
                       "an entry must never be served to another scope (another config)")
            removed = out.run("clear()", cache.clear)
            out.expect(isinstance(removed, int) and removed >= 1, f"clear() must return how many it removed, got "
                       f"{removed!r}")
            out.expect(out.run("get() after clear()", lambda: cache.get(request)) is None,
                       "get() after clear() must be a miss")
        stats = out.run("stats()", cache.stats)
        out.expect(stats is None or (isinstance(stats, dict) and _json_able(stats)),
                   f"stats() must be a JSON-able dict (shown in /info), got {stats!r}")
    finally:
        out.run("close()", cache.close)
    out.raise_for(cache)


# ----------------------------------------------------------------------------------------- batching
def check_batching_plugin(batching: BatchingPlugin) -> None:
    """``plan`` over a grid of loads: never more than pending or ``max_batch_size``, never running an
    empty batch, never waiting past the earliest deadline, always a ``BatchDecision``."""
    out = _Problems()
    _common(batching, out)
    limit = batching.max_batch_size
    out.expect(isinstance(limit, int) and limit >= 1, f"max_batch_size must be an int >= 1, got {limit!r}")
    now = 1000.0
    for pending in (0, 1, 2, 3, limit - 1, limit, limit + 1, 4 * limit):
        if pending < 0:
            continue
        for age_s, deadline_in_s in ((0.0, 30.0), (0.001, 0.002), (0.5, 30.0), (0.0, 0.0)):
            where = f"plan(pending={pending}, age={age_s}s, deadline in {deadline_in_s}s)"
            decision = out.run(where, lambda p=pending, a=age_s, d=deadline_in_s:
                               batching.plan(p, now - a, now + d, now))
            if decision is None:
                continue
            if not isinstance(decision, BatchDecision):
                out.add(f"{where} must return a BatchDecision, got {decision!r}")
                continue
            if decision.run:
                out.expect(pending > 0, f"{where} runs a batch with nothing pending")
                out.expect(1 <= decision.size <= min(pending, limit) if pending else True,
                           f"{where} runs {decision.size} items; must be 1..min(pending, max_batch_size)")
            else:
                out.expect(decision.wait_s >= 0, f"{where} waits a negative time ({decision.wait_s})")
                if pending:
                    out.expect(now + decision.wait_s <= now + deadline_in_s + 1e-9,
                               f"{where} waits {decision.wait_s}s, past the earliest deadline")
    out.run("record()", lambda: batching.record(1, 0.001))
    maximum = out.run("max_request_items()", batching.max_request_items)
    out.expect(maximum is None or (isinstance(maximum, int) and maximum >= 1),
               f"max_request_items() must be None or an int >= 1, got {maximum!r}")
    out.raise_for(batching)


# ------------------------------------------------------------------------------------- quantization
def check_quantization_plugin(quantization: QuantizationPlugin, module: Any, example: Any,
                              device: str = "cpu", min_cosine: float = 0.9) -> None:
    """``apply`` on ``module`` (a small ``torch.nn.Module`` the scheme supports, called with
    ``example``): the rewrite answers with the same shape and close numbers, and says what it did."""
    import torch

    out = _Problems()
    _common(quantization, out)
    out.expect(bool(quantization.scheme_name), "scheme_name must not be empty (reports and errors name it)")
    with torch.inference_mode():
        reference = module(example).float()
    rewritten = out.run(f"apply(module, {device!r})", lambda: quantization.apply(module, device))
    if rewritten is not None:
        with torch.inference_mode():
            got = out.run("the rewritten module's forward", lambda: rewritten(example))
        if got is not None:
            got = got.float()
            out.expect(tuple(got.shape) == tuple(reference.shape),
                       f"the rewrite answers with shape {tuple(got.shape)}, not {tuple(reference.shape)}")
            if got.shape == reference.shape:
                cos = float(torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0))
                out.expect(quantization.is_identity() is False or cos > 0.9999,
                           f"is_identity() is True but the numbers changed (cosine {cos:.6f})")
                out.expect(cos >= min_cosine, f"the rewrite's cosine to the original is {cos:.4f} < {min_cosine}")
    out.expect(isinstance(quantization.summary, dict) and _json_able(quantization.summary),
               f"summary must be a JSON-able dict, got {quantization.summary!r}")
    out.raise_for(quantization)


# ----------------------------------------------------------------------------------------- hardware
def check_hardware_plugin(hardware: HardwarePlugin) -> None:
    """What the composer asks of a hardware plugin before it spawns workers."""
    out = _Problems()
    _common(hardware, out)
    info = out.run("info()", hardware.info)
    if info is not None:
        out.expect(isinstance(info, HardwareInfo), f"info() must return a HardwareInfo, got {info!r}")
        out.expect(getattr(info, "accelerator", None) in ("cpu", "cuda", "mps"),
                   f"info().accelerator must be cpu, cuda or mps, got {getattr(info, 'accelerator', None)!r}")
    workers = out.run("workers_per_device()", hardware.workers_per_device)
    out.expect(workers is None or (isinstance(workers, int) and workers >= 1),
               f"workers_per_device() must be an int >= 1, got {workers!r}")
    for n in (1, 2, 3, 7, 64):
        padded = out.run(f"pad_batch_size({n})", lambda n=n: hardware.pad_batch_size(n))
        out.expect(padded is None or (isinstance(padded, int) and padded >= n),
                   f"pad_batch_size({n}) must be an int >= {n}, got {padded!r}")
    out.raise_for(hardware)

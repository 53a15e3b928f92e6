"""The conformance kit (``framework.testing``) over every built-in plugin, and against broken ones.

A plugin author's tests call the same checks (see ``examples/custom_plugin/tests``); the built-ins
passing them is what makes the kit's contract the framework's real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from framework import BatchDecision, BatchingPlugin, CachePlugin, ModelPlugin, registry
from framework.testing import (
    ConformanceError,
    check_batching_plugin,
    check_cache_plugin,
    check_hardware_plugin,
    check_model_plugin,
    check_quantization_plugin,
)


def plugin(kind: str, name: str, **config: Any):
    cls = registry.get(kind, name)
    return cls(cls.Config(**config))


def test_echo_model_conforms():
    check_model_plugin(plugin("model", "echo"), good_bodies=[{"input": "hello"}, {"input": ["a", "b"]}],
                       bad_bodies=[{}, {"inputs": "typo"}])


def test_tiny_model_conforms(tiny_dir):
    check_model_plugin(plugin("model", "tiny", path=str(tiny_dir)),
                       good_bodies=[{"input": [0.1] * 8}, {"input": [[0.2] * 8, [0.3] * 8]}],
                       bad_bodies=[{}, {"input": "not numbers"}, {"input": [0.1] * 3}])


@pytest.mark.slow
def test_minilm_model_conforms():
    check_model_plugin(plugin("model", "minilm"), good_bodies=[{"input": "hello"}, {"input": ["a cat", "a dog"]}],
                       bad_bodies=[{}, {"input": 3}, {"input": [""]}])


@pytest.mark.parametrize("name", ["none", "memory", "disk"])
def test_exact_cache_plugins_conform(name, tmp_path):
    config = {"directory": str(tmp_path / "cache")} if name == "disk" else {}
    check_cache_plugin(plugin("cache", name, **config))


@pytest.mark.slow
def test_semantic_cache_conforms(tmp_path):
    check_cache_plugin(plugin("cache", "semantic", store="memory"))


@pytest.mark.parametrize("name", ["none", "dynamic", "adaptive"])
def test_batching_plugins_conform(name):
    check_batching_plugin(plugin("batching", name))


@pytest.mark.parametrize("name", ["none", "bf16", "int8_dynamic", "int8_weight_only"])
def test_quantization_plugins_conform_on_cpu(name):
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    check_quantization_plugin(plugin("quantization", name), module, torch.randn(32, 64))


@pytest.mark.parametrize("name", ["cpu", "auto"])
def test_hardware_plugins_conform(name):
    check_hardware_plugin(plugin("hardware", name))


# --- the kit fails when the contract is broken ------------------------------------------------
class _CrashesOnBadInput(ModelPlugin):
    def decode(self, body: dict) -> list[Any]:
        return [body["input"]]  # KeyError (a 500) for a body without "input"

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"output": outputs}

    def load(self, device: str) -> None:
        pass

    def forward(self, batch: Any) -> Any:
        return [len(batch)] * len(batch)  # depends on the batch: differs alone and together


def test_a_model_that_500s_and_depends_on_its_batch_is_refused_with_both_reasons():
    with pytest.raises(ConformanceError) as caught:
        check_model_plugin(_CrashesOnBadInput(), good_bodies=[{"input": "x"}, {"input": "y"}], bad_bodies=[{}])
    text = str(caught.value)
    assert "raised KeyError (a 500)" in text
    caught2 = pytest.raises(ConformanceError, check_model_plugin, _CrashesOnBadInput(),
                            good_bodies=[{"input": "x"}, {"input": "y"}])
    assert "alone and in a batch" in str(caught2.value)


class _ForgetfulCache(CachePlugin):
    def get(self, request):
        return None

    def put(self, request, value: bytes) -> None:
        pass


def test_a_cache_that_never_hits_is_refused():
    with pytest.raises(ConformanceError, match="must return a CacheHit"):
        check_cache_plugin(_ForgetfulCache())


@dataclass
class _GreedyConfig:
    max_batch_size: int = 4


class _WaitsForever(BatchingPlugin):
    Config = _GreedyConfig

    def plan(self, pending_items, oldest_arrival, earliest_deadline, now):
        return BatchDecision(run=False, wait_s=60.0) if pending_items else BatchDecision(run=True, size=8)


def test_a_batcher_that_waits_past_deadlines_and_runs_empty_batches_is_refused():
    with pytest.raises(ConformanceError) as caught:
        check_batching_plugin(_WaitsForever())
    assert "past the earliest deadline" in str(caught.value)
    assert "with nothing pending" in str(caught.value)

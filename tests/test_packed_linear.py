"""hardware.packed_weights: the generation engine's float32 Linear layers on oneDNN-packed weights.

The same engine over a packed and an unpacked copy of one tiny float32 Llama: the same greedy tokens and
the same logits up to float32 summation order; what is never packed (quantized weights, compiled decode,
other dtypes) stays as it was; the worker reports what it packed and the setting turns it off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_llama import build_model, greedy, prompts, run
from torch import nn

from framework.config import compose, validate
from framework.errors import ConfigError
from framework.generation import EngineConfig, GenerationEngine
from plugins.model._llama_batched import LlamaBatchedForward
from plugins.model._packed_linear import PackedLinear, available, pack_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


@pytest.fixture(scope="module")
def model32(model):
    return copy.deepcopy(model).float()


def linears(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if type(m) is nn.Linear]


def test_every_float32_linear_is_packed_and_a_tied_head_counted_as_extra(model32, tokenizer):
    packed = copy.deepcopy(model32)
    before = linears(packed)
    report = pack_linears(packed)
    assert report["packed_linears"] == len(before) == 7 * 2 + 1  # q k v o gate up down per layer, the head
    assert linears(packed) == []
    assert all(isinstance(packed.get_submodule(n), PackedLinear) for n in before)
    tied = model32.lm_head.weight is model32.model.embed_tokens.weight
    head_mib = model32.lm_head.weight.numel() * 4 / 2**20
    assert report["packed_extra_mib"] == (round(head_mib, 1) if tied else 0.0)


def test_packed_weights_give_the_same_greedy_tokens_and_logits(model32, tokenizer):
    packed = copy.deepcopy(model32)
    plain_forward = LlamaBatchedForward(model32, 4, 128)
    packed_forward = LlamaBatchedForward(packed, 4, 128, packed_weights=True)
    assert packed_forward.report == {"packed_weights": True, "packed_linears": 15,
                                     "packed_extra_mib": packed_forward.report["packed_extra_mib"]}
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    batch = prompts(6)

    def generate(forward) -> dict[int, list[int]]:
        engine = GenerationEngine(forward, tokenizer, cfg)
        return run(engine, {0: [greedy(p, 12) for p in batch]})[0]

    with torch.inference_mode():
        plain_out, packed_out = generate(plain_forward), generate(packed_forward)
        x = torch.tensor(batch[0])
        plain_logits = model32(x[None]).logits
        packed_logits = packed(x[None]).logits  # the swapped modules serve the model's own forward too
    assert packed_out == plain_out and all(len(ids) == 12 for ids in packed_out.values())
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_what_has_its_own_kernel_is_left_alone(tokenizer):
    float64 = build_model(tokenizer)  # the engine tests' model: float64, never packed
    assert pack_linears(float64)["packed_linears"] == 0
    assert len(linears(float64)) == 15
    compiled = LlamaBatchedForward(copy.deepcopy(float64).float(), 4, 128, compile_mode="default",
                                   packed_weights=True)
    assert compiled.report == {"packed_weights": False}  # the compiled graph takes plain weights
    assert len(linears(compiled.model)) == 15


def test_a_linear_with_hooks_is_left_alone_and_still_runs_its_hooks():
    """quantization=bf16 keeps a skipped layer (a tied LM head) in float32 with hooks that cast at its
    boundary: packing it would drop them, and the bf16 activations would then reach a float32 kernel."""
    from framework.config import compose, validate
    from plugins.quantization._common import cast_module

    cfg = validate(compose(["model=smollm2", "quantization=bf16", "quantization.skip=[\"1\"]"])).quantization.config
    model, kept = cast_module(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), torch.bfloat16, cfg)
    assert kept == ["1"]
    assert pack_linears(model)["packed_linears"] == 0  # the bf16 layer has no float32 weight; the kept one hooks
    assert model(torch.randn(2, 8)).dtype == torch.float32


def test_quantized_linears_keep_their_kernel(model32):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model32)
    quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, nn.Linear) and
              name != "lm_head")
    report = pack_linears(quantized)
    assert report["packed_linears"] == 1  # the float32 head only
    assert isinstance(quantized.lm_head, PackedLinear)
    assert len(linears(quantized)) == 14


def test_the_setting_is_a_bool_checked_before_start():
    assert validate(compose(["model=smollm2", "hardware=cpu"])).hardware.config.packed_weights is True
    assert compose(["model=smollm2", "hardware=cuda"]).hardware.packed_weights is False  # CPU only
    with pytest.raises(ConfigError, match="packed_weights"):
        validate(compose(["model=smollm2", "hardware=cpu", "hardware.packed_weights=maybe"]))


@pytest.mark.parametrize("packed", [True, False])
def test_an_eager_one_shot_model_runs_on_packed_weights_unless_turned_off(tiny_dir, packed):
    """One-shot models get the same packing at start-up (before the warm-up), and the same answers up to
    float32 summation order; ``hardware.packed_weights=false`` leaves every ``nn.Linear`` as it was."""
    r = validate(compose(["model=tiny", f"model.path={tiny_dir}", "hardware=cpu",
                          f"hardware.packed_weights={str(packed).lower()}"]))
    model = r.model
    model.load("cpu")
    x = model.preprocess([[0.5] * 8, [float(i) for i in range(8)]])
    before = model.forward(x).clone()
    report = r.hardware.optimize(model, "cpu", [1, 2])
    kinds = {type(m) for m in model.module.modules()}
    if packed:
        assert report["packed_linears"] == 2 and PackedLinear in kinds and nn.Linear not in kinds
    else:
        assert "packed_linears" not in report and PackedLinear not in kinds
    torch.testing.assert_close(model.forward(x), before, rtol=1e-5, atol=1e-6)


def test_a_compiled_one_shot_model_is_not_packed(tiny_dir, monkeypatch):
    """torch.compile traces the module as it is: packing is for eager models only."""
    r = validate(compose(["model=tiny", f"model.path={tiny_dir}", "hardware=cpu", "hardware.compile=default",
                          "hardware.warmup=false"]))
    r.model.load("cpu")
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the decision, not inductor's work
    report = r.hardware.optimize(r.model, "cpu", [1])
    assert report["compile_mode"] == "default" and "packed_linears" not in report
    assert PackedLinear not in {type(m) for m in r.model.module.modules()}

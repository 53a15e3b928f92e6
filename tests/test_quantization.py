"""Quantization plugins, the engine's start-up sequence (quality gate, compile, warm-up) and the
capability checks that refuse combinations the hardware cannot run or runs slower than fp32.

CPU only; everything except the one ``slow`` test uses the tiny MLP. Speed is never asserted here
(benchmarks/quantization.py measures it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_int8_dot, needs_native_bf16

from framework import ConfigError, HardwareInfo
from framework.config import compose, validate
from framework.engine import QualityGateError, pad_items, prepare_model, warmup_batch_sizes
from plugins.model.tiny import TinyModel
from plugins.quantization._common import support_problem

CPU_SCHEMES = [pytest.param("bf16", marks=needs_native_bf16), "int8_weight_only", "int8_dynamic"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return TinyModel.build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def isolated_compile_env(monkeypatch, tmp_path):
    """setup_process points inductor at the configured cache; restore the process env afterwards."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused-triton"))
    return tmp_path / "compile-cache"


def resolve(tiny_dir, *overrides: str):
    return validate(compose(["model=tiny", f"model.path={tiny_dir}", "hardware=cpu", *overrides]))


def start(resolved, batch_sizes=(1, 4)) -> dict:
    return prepare_model(resolved.model, resolved.quantization, resolved.hardware, "cpu", list(batch_sizes))


def outputs(resolved) -> torch.Tensor:
    model = resolved.model
    return model.forward(model.preprocess(model.calibration_items()))


# ------------------------------------------------------------------------------ schemes on the CPU
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_each_cpu_scheme_quantizes_tiny_and_meets_its_quality_floor(tiny_dir, scheme):
    r = resolve(tiny_dir, f"quantization={scheme}", "hardware.compile=off", "quantization.allow_slow=true")
    report = start(r)
    assert report["quality_gate"] == "passed"
    assert report["quality"]["min"] >= r.quantization.min_quality >= 0.99
    assert report["quantization"] == scheme and report["compile_mode"] == "off"
    summary = report["quantization_summary"]
    if scheme.startswith("int8"):
        assert summary["quantized_linears"] == 2
        assert type(r.model.module[0].weight).__name__ == "Int8Tensor"
    else:
        assert any(p.dtype == torch.bfloat16 for p in r.model.module.parameters())
    out = outputs(r)
    assert out.shape == (16, 4) and out.dtype == torch.float32  # callers still see float32
    for key in ("load_ms", "quantize_ms", "gate_ms", "compile_ms", "warmup_ms", "startup_ms"):
        assert report[key] >= 0
    assert report["warmup_batch_sizes"] == [1, 4]


def test_none_skips_the_gate_and_keeps_the_module(tiny_dir):
    r = resolve(tiny_dir, "quantization=none", "hardware.compile=auto")
    report = start(r)
    assert report["quality"] is None and report["quality_gate"].startswith("not needed")
    assert report["compile_mode"] == "off"  # auto compiles only rewritten (quantized) weights
    assert isinstance(r.model.module, torch.nn.Sequential)


def test_quality_gate_refuses_to_start_below_min_quality(tiny_dir):
    r = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true",
                "quantization.min_quality=0.99999999")
    with pytest.raises(QualityGateError) as info:
        start(r)
    err = info.value
    assert err.scheme == "int8_dynamic" and err.min_quality == 0.99999999 and err.measured < err.min_quality
    message = str(err)
    assert "quantization=int8_dynamic" in message
    assert f"{err.measured:.4f}" in message
    assert "quantization.min_quality=0.99999999" in message


def test_skip_patterns_keep_layers_in_full_precision(tiny_dir):
    # packed_weights=false: the kept layer would otherwise run on its float32 weight packed for oneDNN
    # (still full precision, but no longer an nn.Parameter to look at).
    r = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true",
                "quantization.skip=[\"2\"]", "hardware.packed_weights=false")
    report = start(r)
    assert report["quantization_summary"]["quantized_linears"] == 1
    assert report["quantization_summary"]["kept_full_precision"] == ["2"]
    assert type(r.model.module[2].weight) is torch.nn.Parameter


@needs_native_bf16
def test_skip_patterns_keep_layers_in_float32_under_bf16(tiny_dir):
    r = resolve(tiny_dir, "quantization=bf16", "quantization.skip=[\"0\"]")
    start(r)
    inner = r.model.module.inner  # the float32-in / float32-out wrapper around the cast module
    assert inner[0].weight.dtype == torch.float32 and inner[2].weight.dtype == torch.bfloat16
    assert outputs(r).dtype == torch.float32  # the boundary casts let fp32 and bf16 layers meet


def test_calibration_file_adds_gate_inputs_and_names_its_key_when_bad(tiny_dir, tmp_path):
    good = tmp_path / "calib.jsonl"
    good.write_text("\n".join(json.dumps({"input": [[0.5] * 8, [-1.0] * 8]}) for _ in range(3)))
    r = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true",
                f"quantization.calibration_file={good}")
    assert start(r)["quality_gate"] == "passed"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"input": [1, 2]}]))  # wrong vector size for the tiny model
    r = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true",
                f"quantization.calibration_file={bad}")
    with pytest.raises(ValueError, match="quantization.calibration_file"):
        start(r)


def test_compiled_and_eager_outputs_agree_and_fill_the_compile_cache(tiny_dir, isolated_compile_env):
    eager = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true")
    start(eager)
    compiled = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=auto",
                       f"hardware.compile_cache_dir={isolated_compile_env}")
    report = start(compiled, batch_sizes=[1, 3])
    assert report["compile_mode"] == "default"  # auto: torchao-quantized weights get compiled
    assert report["warmup_batch_sizes"] == [1, 4]  # 3 is padded to its bucket
    a, b = outputs(eager), outputs(compiled)
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.999
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert any((isolated_compile_env / "inductor").rglob("*")), "compiled code was not written to the cache"


def test_cpp_wrapper_compiles_kernels_called_from_cpp_with_the_same_outputs(tiny_dir, isolated_compile_env):
    import torch._inductor.config as inductor_config

    eager = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=off", "quantization.allow_slow=true")
    start(eager, batch_sizes=[1])
    wrapped = resolve(tiny_dir, "quantization=int8_dynamic", "hardware.compile=default", "hardware.cpp_wrapper=true",
                      f"hardware.compile_cache_dir={isolated_compile_env}")
    # Dynamo would reuse the graph an earlier test compiled for the same forward (modules are inlined,
    # so a new instance passes its guards); a worker compiles once, this process many times.
    torch._dynamo.reset()
    try:
        report = start(wrapped, batch_sizes=[1])
        assert inductor_config.cpp_wrapper is True and report["compile_mode"] == "default"
        a, b = outputs(eager), outputs(wrapped)
        assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.999
        # The generated wrapper is C++ (<hash>.main.cpp); without cpp_wrapper it is a .py module calling
        # the kernels. Looked up where inductor writes now: it reads its cache folder once per process.
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        assert any(Path(cache_dir()).rglob("*.main.cpp")), f"no C++ wrapper under {cache_dir()}"
    finally:
        inductor_config.cpp_wrapper = False  # process-global: later tests compile the ordinary way


# ---------------------------------------------------------------------------------- refusals
def _problems(tiny_dir, *overrides: str) -> list:
    with pytest.raises(ConfigError) as info:
        resolve(tiny_dir, *overrides)
    return info.value.problems


@pytest.mark.parametrize("overrides, key, needles", [
    (["quantization=fp16"], "quantization", ["quantization=fp16", "cpu", "Schemes that run there",
                                              "int8_weight_only"]),
    (["quantization=float8_dynamic"], "quantization", ["float8_dynamic", "8.9", "int8_dynamic"]),
    (["quantization=int4_weight_only"], "quantization", ["int4_weight_only", "no CPU layout", "int8_dynamic"]),
    (["hardware.cuda_graphs=true"], "hardware.cuda_graphs", ["CUDA graphs", "hardware.cuda_graphs=false"]),
    (["hardware.compile=reduce-overhead"], "hardware.compile", ["CUDA graphs", "default"]),
    (["quantization=int8_dynamic", "hardware.compile=off"], "quantization", ["slower than fp32", "compile"]),
    (["quantization=int8_weight_only", "hardware.compile=off"], "quantization", ["slower than fp32", "allow_slow"]),
    (["hardware.compile=sometimes"], "hardware.compile", ["must be one of"]),
    (["hardware.batch_buckets=[4,2]"], "hardware.batch_buckets", ["increasing"]),
    (["hardware.compile=off", "hardware.cpp_wrapper=true"], "hardware.cpp_wrapper", ["torch.compile",
                                                                                      "cpp_wrapper=false"]),
])
def test_unsupported_combinations_are_refused_before_start(tiny_dir, overrides, key, needles):
    problems = _problems(tiny_dir, *overrides)
    match = [p for p in problems if p.key == key]
    assert match, problems
    for needle in needles:
        assert needle in match[0].message, match[0].message


def test_the_fast_cpu_combination_validates(tiny_dir):
    r = resolve(tiny_dir, "quantization=int8_dynamic")  # compile=auto by default
    assert r.hardware.config.compile == "auto"
    r = validate(compose(["experiment=cpu_low_latency", "model=tiny", f"model.path={tiny_dir}"]))
    # the preset quantizes in ONNX Runtime (hardware.onnx_int8), not with torchao (issue 21)
    assert r.names()["quantization"] == "none"
    assert r.hardware.config.runtime == "onnxruntime" and r.hardware.config.onnx_int8 is True


def test_gpu_experiment_composes_and_is_refused_without_cuda():
    cfg = compose(["experiment=gpu_throughput"])
    assert cfg.hardware.name == "cuda" and cfg.hardware.cuda_graphs is True
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            validate(cfg)


def test_int4_refusal_matches_what_torchao_does_on_this_cpu():
    """If a torchao upgrade adds a CPU int4 layout, this fails and the refusal should be revisited."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(Exception):  # noqa: B017 - ImportError (mslk) or AssertionError (CUDA), per layout
        quantize_(lin, Int4WeightOnlyConfig(group_size=128))
        lin(torch.randn(2, 256))


@pytest.mark.parametrize("scheme, capability, refused", [
    ("float8_dynamic", (8, 6), True), ("float8_dynamic", (9, 0), False), ("int4_weight_only", (8, 0), False),
    ("int4_weight_only", (7, 5), True), ("fp16", (7, 5), False), ("bf16", (7, 5), True),
])
def test_cuda_capability_rules(scheme, capability, refused):
    info = HardwareInfo("cuda", True, capability, "Test GPU")
    problem = support_problem(scheme, info)
    assert (problem is not None) == refused
    if problem:
        assert f"compute capability {capability[0]}.{capability[1]}" in problem and "Schemes that run" in problem


def test_bf16_is_refused_on_a_cpu_without_native_bf16():
    emulated = HardwareInfo("cpu", True, None, "AVX2 CPU", extra={"native_bf16": False})
    problem = support_problem("bf16", emulated)
    assert problem is not None and "no native bfloat16" in problem and "int8_weight_only" in problem
    assert support_problem("bf16", HardwareInfo("cpu", True, None, "AMX CPU", extra={"native_bf16": True})) is None


# ------------------------------------------------------------------------------ bucketing
def test_batch_buckets_and_padding(tiny_dir):
    hw = resolve(tiny_dir, "hardware.batch_buckets=[1,2,4,8]").hardware
    assert [hw.pad_batch_size(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    assert warmup_batch_sizes(hw, 8) == [1, 2, 4, 8]
    assert warmup_batch_sizes(hw, 12) == [1, 2, 4, 8, 16]
    assert pad_items(["a", "b", "c"], 4) == ["a", "b", "c", "c"]
    items = ["a"]
    assert pad_items(items, 1) is items


def test_gpu_benchmark_is_importable_and_skips_without_cuda(capsys):
    from benchmarks import gpu_quantization

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would really run")
    assert gpu_quantization.main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the real model
@pytest.mark.slow
@needs_int8_dot
def test_minilm_int8_dynamic_compiled_meets_quality(isolated_compile_env):
    r = validate(compose(["model=minilm", "quantization=int8_dynamic", "hardware=cpu", "hardware.compile=default",
                          f"hardware.compile_cache_dir={isolated_compile_env}"]))
    report = prepare_model(r.model, r.quantization, r.hardware, "cpu", [1])
    assert report["quality"]["min"] >= 0.99 and report["compile_mode"] == "default"
    out = r.model.postprocess(r.model.forward(r.model.preprocess(["hello world"])))
    assert len(out) == 1

"""``hardware.runtime=onnxruntime``: the same embeddings as torch over HTTP, a cached export on the second
start, a quality gate that refuses a bad int8 recipe, and bad settings refused before any process starts."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from framework.launch import ServerFailedToStart

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from test_cli import hydraserve  # noqa: E402  (tests/ is on sys.path)

SENTENCES = ["The cat sits on the mat.", "A latency-first model server.", "hello"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and MiniLM's tokenizer: small, but the real export path."""
    import torch

    from plugins._text_encoder import packaged_minilm_dir, transformers_importable

    with transformers_importable():
        from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _embed(url: str) -> np.ndarray:
    r = httpx.post(url + "/predict", json={"input": SENTENCES}, timeout=60)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"], dtype=np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _overrides(folder: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["model=hf_embedding", f"model.path={folder}", "hardware=cpu", "cache=none", "tracing=none",
            "batching=none", f"hardware.compile_cache_dir={cache_dir}", *extra]


def test_onnxruntime_serves_the_torch_embeddings_and_reuses_its_export(serve, tiny_encoder, tmp_path):
    cache_dir = tmp_path / "compile-cache"
    torch_server = serve(_overrides(tiny_encoder, cache_dir))
    expected = _embed(torch_server.url)
    torch_server.stop()

    first = serve(_overrides(tiny_encoder, cache_dir, "hardware.runtime=onnxruntime"))
    got = _embed(first.url)
    assert _cosines(got, expected).min() >= 0.9999
    engine = httpx.get(first.url + "/info", timeout=10).json()["engine"][0]
    assert engine["runtime"] == "onnxruntime"
    assert engine["onnx"]["cached"] is False and engine["onnx"]["quality"]["min"] >= 0.99
    assert "CPUExecutionProvider" in engine["onnx"]["providers"]
    assert Path(engine["onnx"]["path"]).parent == cache_dir / "onnx"
    # the OpenAI route runs on the same session
    r = httpx.post(first.url + "/v1/embeddings", json={"input": SENTENCES[0], "encoding_format": "float"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    first.stop()

    second = serve(_overrides(tiny_encoder, cache_dir, "hardware.runtime=onnxruntime"))
    assert httpx.get(second.url + "/info", timeout=10).json()["engine"][0]["onnx"]["cached"] is True
    assert _cosines(_embed(second.url), expected).min() >= 0.9999


def test_int8_below_the_floor_refuses_to_start(serve, tiny_encoder, tmp_path):
    # a floor no int8 recipe can meet: the worker must refuse, and say which field to change
    with pytest.raises(ServerFailedToStart) as failed:
        serve(_overrides(tiny_encoder, tmp_path / "cc", "hardware.runtime=onnxruntime", "hardware.onnx_int8=true",
                         "hardware.onnx_min_quality=1.0"))
    assert "hardware.onnx_min_quality=1.0" in str(failed.value)
    assert "hardware.onnx_int8_exclude" in str(failed.value)


def test_int8_with_every_layer_kept_in_fp32_serves(serve, tiny_encoder, tmp_path):
    server = serve(_overrides(tiny_encoder, tmp_path / "cc", "hardware.runtime=onnxruntime", "hardware.onnx_int8=true",
                              "hardware.onnx_int8_exclude=[*]"))
    engine = httpx.get(server.url + "/info", timeout=10).json()["engine"][0]
    assert engine["onnx"]["int8"] is True and engine["onnx"]["int8_layers"] == 0
    assert engine["onnx"]["quality"]["min"] >= 0.9999


def test_validate_refuses_bad_runtime_settings(tmp_path):
    result = hydraserve("validate", "hardware=cpu", "hardware.runtime=tensorflow", cwd=tmp_path)
    assert result.returncode == 2
    assert "hardware.runtime: must be one of torch, onnxruntime, got 'tensorflow'" in result.stderr

    result = hydraserve("validate", "hardware=cpu", "quantization=int8_dynamic", "hardware.compile=default",
                        "hardware.cpp_wrapper=true", "hardware.runtime=onnxruntime", cwd=tmp_path)
    assert result.returncode == 2
    assert "hardware.compile: torch.compile does not run under hardware.runtime=onnxruntime" in result.stderr
    assert "hardware.cpp_wrapper:" in result.stderr
    assert "quantization=int8_dynamic rewrites it" in result.stderr and "use quantization=none" in result.stderr

    result = hydraserve("validate", "hardware=cpu", "hardware.onnx_int8=true", cwd=tmp_path)
    assert result.returncode == 2
    assert "hardware.onnx_int8: only applies with hardware.runtime=onnxruntime" in result.stderr

    result = hydraserve("validate", "hardware=cpu", "hardware.runtime=onnxruntime", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = hydraserve("validate", "experiment=cpu_low_latency", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_validate_names_the_missing_package(tmp_path):
    # a Python in which onnxruntime cannot be found (a meta-path finder refusing it), as without the extra
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'onnxruntime':\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n")
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{root}"}
    result = subprocess.run([sys.executable, "-m", "framework.cli", "validate", "hardware=cpu",
                             "hardware.runtime=onnxruntime"], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 2
    assert "hardware.runtime: onnxruntime needs the package(s) onnxruntime" in result.stderr
    assert "pip install 'hydraserve[onnx]'" in result.stderr


def test_int8_answers_never_share_cache_entries_with_torch():
    from framework.cache_key import cache_scope
    from plugins.hardware.cpu import CpuHardware

    def scope(**settings) -> str:
        hw = CpuHardware(CpuHardware.Config(**settings))
        return cache_scope({"model": "m", "weights": "w"}, {"name": "none"}, {"max_length": 256}, hw.numerics())

    plain = cache_scope({"model": "m", "weights": "w"}, {"name": "none"}, {"max_length": 256})
    assert scope() == plain  # torch (eager or compiled): existing cache entries stay valid
    assert scope(runtime="onnxruntime") != plain
    assert scope(runtime="onnxruntime", onnx_int8=True) not in (plain, scope(runtime="onnxruntime"))

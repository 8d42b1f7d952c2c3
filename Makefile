# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine:
# each creates the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typing bench sync docs docs-serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: a simulated LLM gateway on the embedded default store
	$(BIN)/python examples/gateway_demo.py

test: $(STAMP)  ## the whole test suite, on asyncio and trio
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typing: $(STAMP)
	$(BIN)/mypy

check: lint typing

sync: $(STAMP)  ## regenerate the blocking methods of src/ducto/sync.py after a signature changed
	$(BIN)/python -m ducto._syncgen

docs: $(STAMP)  ## the documentation site, built offline into site/; any warning fails it
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)  ## the documentation site on http://127.0.0.1:8000, rebuilt on change
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_store.py --store memory

clean:
	rm -rf $(VENV) build dist site .nox .mypy_cache .ruff_cache .pytest_cache

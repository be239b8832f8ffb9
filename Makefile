# tensorgate: `make demo` and `make test` set everything up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml sdk/pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo up test lint typecheck protos api-docs check-protos bench models clean

$(STAMP): pyproject.toml sdk/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./sdk -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

NODE_CLIENT := tests/node/node_modules/.package-lock.json

$(NODE_CLIENT): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --silent --no-audit --no-fund

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tensorgate demo

up: setup
	$(VENV)/bin/tensorgate up

test: setup lint $(NODE_CLIENT)
	$(PY) -m pytest -ra

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services gateway launcher sdk/tensorgate tools bench tests models/training
	$(VENV)/bin/lint-imports

# The generated code and the API reference (docs/api.md) both come from protos/.
protos: setup
	$(PY) tools/gen_protos.py
	$(PY) tools/gen_api_docs.py

api-docs: setup
	$(PY) tools/gen_api_docs.py

bench: setup
	$(PY) -m bench $(ARGS)

models: setup
	$(PY) models/training/train_tinylm.py
	$(PY) models/training/train_digits.py

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make run` (a node on the embedded default) and
# `make test` (lint, types, the whole default test suite). Both create the virtual
# environment and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/nkservice serve $(if $(CONFIG),--config $(CONFIG))

test: $(INSTALLED)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy --strict src tests examples
	$(BIN)/pytest -q

bench: $(INSTALLED)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# WebSocket conformance (Autobahn TestSuite, on Python 2.7); not part of `make test`.
.PHONY: conformance
conformance: $(INSTALLED)
	$(BIN)/python bench/conformance/run.py

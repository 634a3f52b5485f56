# Two commands on a fresh machine: `make run` and `make test` (Python 3.11+ and make only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test stack lint format migrate superuser clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

## Serve the API on the embedded default (SQLite, in-process backends, data in ./var).
run: $(VENV)/.installed
	$(BIN)/python -m app serve --host $(HOST) --port $(PORT)

## The compose topology without Docker, from system packages (see README: Native stack).
stack: $(VENV)/.installed
	$(BIN)/python -m deploy.stack

## Lint and check formatting (ruff), as `make test` does first.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Lint, check formatting, and run the whole test suite.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

migrate: $(VENV)/.installed
	$(BIN)/python -m app migrate

superuser: $(VENV)/.installed
	$(BIN)/python -m app create-superuser --email "$(EMAIL)" --username "$(USERNAME)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

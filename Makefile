# Two entry points: `make run` serves the shipped config, `make test` runs every check.
# Both create the virtualenv and install what they need on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/proxy.yaml

.PHONY: run test lint typecheck unit check bench clean sysdeps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/resilience-proxy run --config $(CONFIG)

check: $(STAMP)
	$(BIN)/resilience-proxy check --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# System tools some tests need (chromium, promtool, nginx, wrk); installed when missing.
sysdeps:
	@bash .ci/sysdeps

test: $(STAMP) sysdeps lint typecheck unit

bench: $(STAMP) sysdeps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info test-artifacts

# Two entry points: `make run` serves the shipped config, `make test` runs every check.
# Both create the virtualenv and install what they need on first use: `make run` only the
# runtime (requirements.lock, hash-checked, and the package), `make test` the dev tools too.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed
CONFIG ?= config/proxy.yaml

.PHONY: run test lint typecheck unit check bench clean sysdeps lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What serving needs: the locked runtime dependencies, every file checked against its hash,
# and the package itself (editable, without resolving anything else).
$(RUN_STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --require-hashes -r requirements.lock
	$(PIP) install -q --no-deps -e .
	@touch $@

# What the checks need on top: the dev extras (pytest, ruff, mypy, the provider SDKs, ...).
$(STAMP): $(RUN_STAMP)
	$(PIP) install -q -e '.[dev]'
	@touch $@

run: $(RUN_STAMP)
	$(BIN)/resilience-proxy run --config $(CONFIG)

check: $(RUN_STAMP)
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

# Regenerate requirements.lock from pyproject.toml's `dependencies` after changing them:
# pip-tools in a throwaway virtualenv, hashes of every file on PyPI (the image is CPython 3.11
# on linux x86_64; run this with such a Python so markers resolve as they do there).
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install -q pip-tools
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null build/lock-venv/bin/pip-compile --quiet \
	  --generate-hashes --strip-extras --no-emit-index-url --index-url https://pypi.org/simple \
	  --output-file requirements.lock pyproject.toml
	rm -rf build/lock-venv

clean:
	rm -rf $(VENV) build dist *.egg-info test-artifacts

# Two entry points: `make run` serves the shipped config, `make test` runs every check.
# Both create the virtualenv and install what they need on first use: `make run` only the
# runtime (requirements.lock, hash-checked, and the package, its request path compiled by
# Cython: setup.py), `make test` the dev tools too.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed
BUILD_STAMP := $(VENV)/.built
SOURCES := $(shell find proxy -name '*.py')
CONFIG ?= config/proxy.yaml

.PHONY: run test lint typecheck unit check bench clean sysdeps lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What serving needs: the locked runtime dependencies, every file checked against its hash,
# and the package itself (editable, without resolving anything else).
$(RUN_STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --require-hashes -r requirements.lock
	$(PIP) install -q 'Cython>=3.1,<4' 'setuptools>=68' wheel
	RESILIENCE_PROXY_PURE=1 $(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

# The request-path modules compiled in place by Cython (setup.py), next to their sources;
# redone when a source changes, and only for the modules that changed. Without a C compiler
# the proxy runs as pure Python, which behaves the same, slower.
$(BUILD_STAMP): $(SOURCES) setup.py | $(RUN_STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $@

# What the checks need on top: the dev extras (pytest, ruff, mypy, the provider SDKs, ...).
$(STAMP): $(RUN_STAMP)
	RESILIENCE_PROXY_PURE=1 $(PIP) install -q --no-build-isolation -e '.[dev]'
	@touch $@

run: $(BUILD_STAMP)
	$(BIN)/resilience-proxy run --config $(CONFIG)

check: $(BUILD_STAMP)
	$(BIN)/resilience-proxy check --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench setup.py
	$(BIN)/ruff format --check proxy

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(BUILD_STAMP)
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
	find proxy -name '*.so' -delete

"""Helpers for config tests: load YAML text with an explicit environment, list problems."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping

import pytest

from proxy.config import Config, ConfigInvalid, load_config_text

SOURCE = "config/proxy.yaml"


def load(
    text: str, env: Mapping[str, str] | None = None, *, require_routes: bool = False
) -> Config:
    """Load dedented YAML text as if it were config/proxy.yaml, with `env` (default: empty).

    Most tests check one section on its own, so a config without routes is accepted here
    unless `require_routes`; `load_config` (files: check, run, reload) always needs one.
    """
    return load_config_text(
        textwrap.dedent(text), source=SOURCE, env=env or {}, require_routes=require_routes
    )


def problems(
    text: str, env: Mapping[str, str] | None = None, *, require_routes: bool = False
) -> list[str]:
    """Every problem line for a config that must be invalid."""
    with pytest.raises(ConfigInvalid) as caught:
        load(text, env, require_routes=require_routes)
    return [str(p) for p in caught.value.problems]


@pytest.fixture
def load_yaml() -> Callable[..., Config]:
    return load


@pytest.fixture
def problems_of() -> Callable[..., list[str]]:
    return problems

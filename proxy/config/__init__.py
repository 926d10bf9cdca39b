"""Configuration: YAML file → validated, frozen `Config` (DESIGN §3, §4).

The whole path, in order:

    read bytes ─→ parse YAML, keeping every key's line      (loader.parse_yaml)
               ─→ expand ${VAR} inside scalar values         (loader.expand_env)
               ─→ check names and references on the raw tree (compile.check_references)
               ─→ validate the shape and units               (schema.ConfigSpec)
               ─→ merge policies, apply defaults, compile    (compile.compile_config)

Every step adds its problems to one list; any problem at all raises `ConfigInvalid`
carrying all of them, each printed as `FILE:LINE: key.path: message`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from pydantic import ValidationError

from proxy.config.compile import check_references, compile_config
from proxy.config.loader import ConfigInvalid, Problem, expand_env, parse_yaml
from proxy.config.model import Config
from proxy.config.schema import ConfigSpec, json_schema, validation_problems

__all__ = [
    "Problem",
    "ConfigInvalid",
    "load_config",
    "load_config_text",
    "json_schema",
    "default_config_path",
    "Config",
]

DEFAULT_CONFIG_PATH = "config/proxy.yaml"
CONFIG_PATH_VARIABLE = "RESILIENCE_PROXY_CONFIG"


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    """`$RESILIENCE_PROXY_CONFIG` when set and not empty, else `config/proxy.yaml`."""
    env = os.environ if env is None else env
    return env.get(CONFIG_PATH_VARIABLE) or DEFAULT_CONFIG_PATH


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config file at `path`; raises `ConfigInvalid` with every problem.

    Relative paths inside the file (CA bundles, the token file, the state file) are taken
    relative to the file's directory. `env` defaults to `os.environ`.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigInvalid([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigInvalid([Problem(path, line, "", "not UTF-8 text")]) from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return _load(text, path, base_dir, env, hashlib.sha256(data).hexdigest())


def load_config_text(
    text: str, source: str = "<text>", env: Mapping[str, str] | None = None
) -> Config:
    """Like `load_config`, for YAML text; relative paths start at the working directory."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _load(text, source, os.getcwd(), env, digest)


def _load(
    text: str, source: str, base_dir: str, env: Mapping[str, str] | None, digest: str
) -> Config:
    env = os.environ if env is None else env
    doc = parse_yaml(text, source)
    expand_env(doc, env)
    if doc.data is None:
        doc.data = {}  # an empty file: every default, no routes
    if not isinstance(doc.data, dict):
        doc.problem((), "the top level must be a mapping (version, listen, upstreams, routes, ...)")
        raise ConfigInvalid(doc.problems)
    check_references(doc)
    try:
        spec = ConfigSpec.model_validate(doc.data)
    except ValidationError as exc:
        validation_problems(exc, doc)
        raise ConfigInvalid(doc.problems) from None
    if doc.problems:
        raise ConfigInvalid(doc.problems)
    config = compile_config(spec, doc, base_dir=base_dir, env=env, digest=digest)
    if config is None:
        raise ConfigInvalid(doc.problems)
    return config

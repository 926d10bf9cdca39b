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
from dataclasses import replace

from pydantic import ValidationError

from proxy.config.compile import check_raw, check_references, compile_config, warn_unreachable
from proxy.config.loader import (
    MAX_FILE_BYTES,
    ConfigInvalid,
    Problem,
    combined_digest,
    expand_env,
    file_digest,
    parse_yaml,
)
from proxy.config.model import Config
from proxy.config.schema import ConfigSpec, json_schema, validation_problems

__all__ = [
    "Problem",
    "ConfigInvalid",
    "load_config",
    "load_config_text",
    "json_schema",
    "default_config_path",
    "watch_digest",
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
            data = handle.read(MAX_FILE_BYTES + 1)  # bounded: `--config /dev/zero` too
    except OSError as exc:
        raise ConfigInvalid([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        message = f"larger than {MAX_FILE_BYTES // 1024} KiB: not a config file"
        raise ConfigInvalid([Problem(path, None, "", message)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigInvalid([Problem(path, line, "", "not UTF-8 text")]) from None
    base_dir = os.path.dirname(os.path.abspath(path))
    return _load(text, path, base_dir, env, hashlib.sha256(data).hexdigest())


def load_config_text(
    text: str,
    source: str = "<text>",
    env: Mapping[str, str] | None = None,
    *,
    require_routes: bool = True,
) -> Config:
    """Like `load_config`, for YAML text; relative paths start at the working directory.

    `require_routes=False` accepts a config without routes (a fragment, e.g. to check one
    section on its own); a file to serve always needs one.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    return _load(text, source, os.getcwd(), env, digest, require_routes)


def watch_digest(config_path: str, files: tuple[str, ...]) -> str | None:
    """What a loaded config's `hash` becomes if the file at `config_path` and the `files`
    it reads are loaded now: a watcher compares it with the running config's. None when
    the config file cannot be read."""
    digest = file_digest(config_path, MAX_FILE_BYTES)
    if digest is None:
        return None
    return combined_digest(digest, {path: file_digest(path) for path in files})


def _load(
    text: str,
    source: str,
    base_dir: str,
    env: Mapping[str, str] | None,
    digest: str,
    require_routes: bool = True,
) -> Config:
    env = os.environ if env is None else env
    try:
        return _validate(text, source, base_dir, env, digest, require_routes)
    except RecursionError:  # backstops: the caps in the loader should stop both first
        message = "nested too deeply to validate"
    except MemoryError:
        message = "too large to validate"
    raise ConfigInvalid([Problem(source, None, "", message)])


def _validate(
    text: str, source: str, base_dir: str, env: Mapping[str, str], digest: str, require_routes: bool
) -> Config:
    doc = parse_yaml(text, source)
    expand_env(doc, env, base_dir)
    if doc.data is None:
        doc.data = {}  # an empty file (or `~`): reported below as having no routes
    if not isinstance(doc.data, dict):
        doc.problem((), "the top level must be a mapping (version, listen, upstreams, routes, ...)")
        raise ConfigInvalid(doc.problems)
    check_raw(doc, require_routes=require_routes)
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
    warn_unreachable(doc, config.routes)
    return replace(
        config,
        hash=combined_digest(digest, dict(doc.files)),
        watched_files=tuple(sorted(doc.files)),
        warnings=tuple(sorted(doc.warnings, key=lambda p: (p.line or 0, p.path, p.message))),
    )

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

import copy
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from proxy.config.compile import check_raw, check_references, compile_config, warn_unreachable
from proxy.config.loader import (
    MAX_FILE_BYTES,
    ConfigInvalid,
    Document,
    Path,
    Problem,
    combined_digest,
    expand_env,
    file_digest,
    format_path,
    parse_yaml,
)
from proxy.config.model import Config
from proxy.config.schema import ConfigSpec, _error_path, json_schema, validation_problems

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
        _cross_checks_despite(exc, doc, base_dir, env, digest)
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


def _cross_checks_despite(
    exc: ValidationError, doc: Document, base_dir: str, env: Mapping[str, str], digest: str
) -> None:
    """The rules between keys (`open_for_max` >= `open_for`, a readable `ca_file`, ...) run
    at compile time, once every value is valid; so that they are reported in the same pass
    as the invalid values, compile a copy of the file with the invalid values left out, and
    keep what it finds away from them: nothing in a route, policy, upstream, target or
    section that had a value left out (a default in its place could mislead)."""
    data = copy.deepcopy(doc.data)
    left_out: list[Path] = []
    for _ in range(3):  # a block left out may leave its parent missing a required key
        points = [_leave_out_point(error, data, doc.source) for error in exc.errors()]
        if any(point is None for point in points):
            return  # e.g. a route without a name: leaving it out would renumber the others
        for point in points:
            assert point is not None
            _remove(data, point)
            left_out.append(point)
        try:
            spec = ConfigSpec.model_validate(data)
            break
        except ValidationError as again:
            exc = again
    else:
        return
    shadow = dataclasses.replace(doc, data=data, problems=[], broken=set(), warnings=[])
    compile_config(spec, shadow, base_dir=base_dir, env=env, digest=digest)
    scopes = _scopes(left_out, data)
    for problem in shadow.problems:
        if not any(_within(problem.path, scope) for scope in scopes):
            doc.problems.append(problem)


def _leave_out_point(error: Any, data: Any, source: str) -> Path | None:
    """The mapping key to remove so that `error` goes away, or None when there is none."""
    path, missing = _error_path(error, Document(source=source, data=data))
    if missing:
        path = path[:-1]  # a required key is missing: leave out the block that needs it
    while path and isinstance(path[-1], int):
        path = path[:-1]  # a bad list item: leave out the whole list
    if not path or (len(path) == 1 and path[0] in ("routes", "postgres")):
        return None
    return path


def _remove(data: Any, path: Path) -> None:
    node = data
    for part in path[:-1]:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _scopes(left_out: list[Path], data: Any) -> set[str]:
    """Where a second-pass problem may be misled: the top-level item (a route, policy,
    upstream, postgres target, or a whole section) of each value left out, and the routes
    and policies merged with it."""
    routes = data.get("routes") if isinstance(data, dict) else None
    policy_of = {
        index: route.get("policy")
        for index, route in enumerate(routes if isinstance(routes, list) else [])
        if isinstance(route, dict)
    }
    scopes: set[Path] = set()
    for path in left_out:
        scope = path[:2] if path[0] in ("routes", "policies", "upstreams", "postgres") else path[:1]
        scopes.add(scope)
        index = scope[1] if len(scope) == 2 else None
        if (
            scope[0] == "routes"
            and isinstance(index, int)
            and isinstance(policy_of.get(index), str)
        ):
            scopes.add(("policies", str(policy_of[index])))
        if scope[0] == "policies" and len(scope) == 2:
            scopes.update(("routes", i) for i, name in policy_of.items() if name == scope[1])
    return {format_path(scope) for scope in scopes}


def _within(path: str, scope: str) -> bool:
    return path == scope or path.startswith((scope + ".", scope + "["))

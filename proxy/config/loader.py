"""YAML text → a plain tree that remembers the line of every key, then `${VAR}` expansion.

Parsing and expansion are separate on purpose: `${VAR}` is replaced inside scalar values
of the parsed tree, never in the YAML text, so a variable can never inject YAML structure.
Keys keep their spelling as written (YAML 1.1 would turn the key `on:` into `True`).

Every problem found on the way is a `Problem` naming the file, line and key path; loading
collects them all and raises one `ConfigInvalid`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

# `${NAME}` or `${NAME:-default}`; the default may be empty and may not contain `}`.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CONTROL = ("\r", "\n", "\0")
# Values that are knobs, not credentials: kept out of `Config.secrets`, so that scrubbing
# logs for secrets never blanks every "3" or "60s" (they are still redacted in /config).
_KNOB = re.compile(
    r"\s*(true|false|yes|no|on|off|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|%|[kmg]i?b|b)?)\s*",
    re.IGNORECASE,
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, printed as `FILE:LINE: key.path: message`."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigInvalid(Exception):
    """The config cannot be used; `problems` lists every reason found, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        ordered = sorted(
            set(problems), key=lambda p: (p.file, p.line is None, p.line or 0, p.path, p.message)
        )
        self.problems: tuple[Problem, ...] = tuple(ordered)
        super().__init__("\n".join(str(p) for p in self.problems))


def format_path(path: Path) -> str:
    """`("routes", 1, "retry", "max_attempts")` → `routes[1].retry.max_attempts`.

    Keys with characters other than letters, digits, `_` and `-` are bracket-quoted
    (`upstreams["api.v2"].url`) so the path stays unambiguous.
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


@dataclass(slots=True)
class Document:
    """A parsed config file: the plain tree plus what is known about each of its paths."""

    source: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)  # key (or list item) → 1-based line
    env_vars: dict[Path, tuple[str, ...]] = field(default_factory=dict)  # set from these vars
    empty_vars: set[Path] = field(default_factory=set)  # some ${VAR} in it expanded to ""
    broken: set[Path] = field(default_factory=set)  # already reported; skip later errors here
    secrets: set[str] = field(default_factory=set)  # non-empty values taken from the environment
    problems: list[Problem] = field(default_factory=list)

    def line(self, path: Path) -> int:
        """The line of `path`, else of its nearest ancestor that exists (a missing key's parent)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def has(self, path: Path) -> bool:
        """True when the file itself spells out `path` (not a default)."""
        node = self.data
        for part in path:
            if isinstance(node, dict) and isinstance(part, str) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return False
        return True

    def from_env(self, path: Path) -> bool:
        """True when `path`, or a value under it, got any part of its text from a variable."""
        size = len(path)
        return any(p[:size] == path for p in self.env_vars)

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.source, self.line(path), format_path(path), message))
        self.broken.add(path)


def parse_yaml(text: str, source: str) -> Document:
    """Parse one YAML document into plain dicts, lists and scalars, recording every line.

    Raises `ConfigInvalid` for YAML syntax errors (with the YAML's own line). Duplicate keys
    and non-scalar keys are collected as problems in the returned document.
    """
    loader = yaml.SafeLoader(text)
    doc = Document(source=source, data=None)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.lines[()] = node.start_mark.line + 1
            doc.data = _Walker(loader, doc).walk(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        line = mark.line + 1 if mark is not None else None
        raise ConfigInvalid([Problem(source, line, "", f"YAML syntax error: {message}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigInvalid([Problem(source, None, "", f"YAML syntax error: {exc}")]) from None
    finally:
        loader.dispose()
    return doc


class _Walker:
    """Builds the plain tree from composed YAML nodes (anchors, aliases and `<<` included)."""

    def __init__(self, loader: yaml.SafeLoader, doc: Document) -> None:
        self._loader = loader
        self._doc = doc
        self._active: set[int] = set()  # nodes being walked: a recursive alias is refused

    def walk(self, node: yaml.Node, path: Path) -> Any:
        if id(node) in self._active:
            self._doc.problem(path, "a recursive YAML alias is not supported")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                items = []
                for index, item in enumerate(node.value):
                    self._doc.lines[(*path, index)] = item.start_mark.line + 1
                    items.append(self.walk(item, (*path, index)))
                return items
            return self._loader.construct_object(node, deep=True)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        # Duplicates are looked for among the keys written in this mapping only: keys merged
        # in with `<<: *anchor` may be overridden, as YAML intends.
        first_seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in first_seen:
                    self._doc.problems.append(
                        Problem(
                            self._doc.source,
                            line,
                            format_path((*path, key_node.value)),
                            f"duplicate key (first at line {first_seen[key_node.value]})",
                        )
                    )
                else:
                    first_seen[key_node.value] = line
        self._loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._doc.problems.append(
                    Problem(
                        self._doc.source,
                        key_node.start_mark.line + 1,
                        format_path(path),
                        "keys must be plain strings",
                    )
                )
                continue
            key = str(key_node.value)  # as written: `on`, `yes` and `503` stay strings
            child = (*path, key)
            self._doc.lines[child] = key_node.start_mark.line + 1
            out[key] = self.walk(value_node, child)
        return out


def expand_env(doc: Document, env: Mapping[str, str]) -> None:
    """Replace `${VAR}` / `${VAR:-default}` in every string scalar of `doc.data`, in place.

    Shell semantics: `${VAR:-default}` uses the default when VAR is unset or empty; `${VAR}`
    with VAR unset is a problem naming VAR and the key. A result containing CR, LF or NUL
    is a problem (a variable must not smuggle in a header line). Records which paths took
    text from the environment (`env_vars`, for redaction), which had a reference expand to
    "" (`empty_vars`, to omit such injected headers), and the secret values themselves.
    """
    doc.data = _expand_node(doc, doc.data, (), env)


def _expand_node(doc: Document, node: Any, path: Path, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _expand_node(doc, value, (*path, key), env) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand_node(doc, value, (*path, i), env) for i, value in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        return _expand_scalar(doc, node, path, env)
    return node


def _expand_scalar(doc: Document, text: str, path: Path, env: Mapping[str, str]) -> str:
    used: list[str] = []
    missing: list[str] = []
    empty = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal empty
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:
            used.append(name)
            if not _KNOB.fullmatch(value):
                doc.secrets.add(value)
            return value
        if default is not None:
            value = default
        elif value is None:
            missing.append(name)
            return ""
        if not value:
            empty = True
        return value

    result = ENV_REFERENCE.sub(substitute, text)
    if "${" in ENV_REFERENCE.sub("", text):
        doc.problem(
            path,
            "malformed variable reference: write ${NAME} or ${NAME:-default} (NAME: A-Z, 0-9, _)",
        )
        return result
    for name in missing:
        doc.problem(
            path,
            f"environment variable {name} is not set "
            f"(write ${{{name}:-}} to make it optional, or ${{{name}:-DEFAULT}})",
        )
    if missing:
        return result
    if used:
        doc.env_vars[path] = tuple(used)
    if empty:
        doc.empty_vars.add(path)
    if any(char in result for char in _CONTROL):
        names = ", ".join(f"${{{name}}}" for name in used) or "its variables"
        doc.problem(path, f"contains a control character (CR, LF or NUL) after expanding {names}")
    return result

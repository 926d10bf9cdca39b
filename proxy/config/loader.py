"""YAML text → a plain tree that remembers the line of every key, then `${VAR}` expansion.

Parsing and expansion are separate on purpose: `${VAR}` is replaced inside scalar values
of the parsed tree, never in the YAML text, so a variable can never inject YAML structure.
Keys keep their spelling as written (YAML 1.1 would turn the key `on:` into `True`).

Every problem found on the way is a `Problem` naming the file, line and key path; loading
collects them all and raises one `ConfigInvalid`.

A config is small, so what one may expand to is capped (`MAX_*` below): the caps are what
bound the time and memory of a load, since a thread parsing a hostile file can be neither
stopped nor memory-capped from outside. Each node of the YAML graph is visited once: an
alias is measured once, built once, and shares the anchor's value in the tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

MAX_FILE_BYTES = 256 * 1024  # the config file itself (the shipped one is ~10 KiB)
MAX_SCALAR_CHARS = 64 * 1024  # one value, as written or after expanding ${...}
MAX_DEPTH = 64  # nesting of mappings and lists, aliases followed
MAX_ALIASES = 1000  # `*name` references in the file
MAX_NODES = 50_000  # values in the tree, counted once every alias is copied out
MAX_SECRET_FILE_BYTES = 64 * 1024  # a ${file:PATH} or admin.token_file

# `${NAME}`, `${NAME:-default}` or `${file:PATH}`; the default and PATH may not contain `}`.
ENV_REFERENCE = re.compile(r"\$\{(?:file:([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")
_CONTROL = ("\r", "\n", "\0")
# Values that are knobs, not credentials: kept out of `Config.secrets`, so that scrubbing
# logs for secrets never blanks every "3" or "60s" (and /config shows them as they are).
_KNOB = re.compile(
    r"\s*(true|false|yes|no|on|off|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|%|[kmg]i?b|b)?)\s*",
    re.IGNORECASE,
)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, printed as `FILE:LINE: key.path: message`.

    A warning (`FILE:LINE: key.path: warning: message`) never makes a config invalid.
    """

    file: str
    line: int | None
    path: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        message = f"warning: {self.message}" if self.warning else self.message
        return f"{where}: {self.path}: {message}" if self.path else f"{where}: {message}"


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
    warnings: list[Problem] = field(default_factory=list)
    # An alias site → the path where its anchored node was first built: lines under an
    # alias are those of the anchor's own text.
    aliases: dict[Path, Path] = field(default_factory=dict)
    expanded: set[Path] = field(default_factory=set)  # held a ${...}, expanded or default
    file_vars: set[Path] = field(default_factory=set)  # took text from a ${file:PATH}
    file_secrets: set[str] = field(default_factory=set)  # the values read by ${file:PATH}
    files: dict[str, str] = field(default_factory=dict)  # files read → sha256 of their bytes

    def line(self, path: Path) -> int:
        """The line of `path`, else of its nearest ancestor that exists (a missing key's parent)."""
        for _ in range(MAX_DEPTH + 1):  # each step leaves one alias site for its anchor
            if path in self.lines:
                return self.lines[path]
            for size in range(len(path) - 1, 0, -1):
                prefix = path[:size]
                if prefix in self.aliases:
                    path = (*self.aliases[prefix], *path[size:])
                    break
                if prefix in self.lines:
                    return self.lines[prefix]
            else:
                break
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

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(
            Problem(self.source, self.line(path), format_path(path), message, warning=True)
        )

    def read_file(self, path: str) -> str:
        """The trimmed UTF-8 text of a small regular file named by the config (a mounted
        Secret); remembers its digest so a watcher can see it change. ValueError: why not."""
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            with open(path, "rb") as handle:
                data = handle.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            raise ValueError(exc.strerror or type(exc).__name__) from None
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"larger than {MAX_SECRET_FILE_BYTES // 1024} KiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        self.files[path] = hashlib.sha256(data).hexdigest()
        return text.strip()


def file_digest(path: str, limit: int = MAX_SECRET_FILE_BYTES) -> str | None:
    """sha256 of the first `limit` + 1 bytes of `path` (enough to tell a change), or None
    when it is missing or not a regular file (a FIFO would block the reader forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read(limit + 1)).hexdigest()
    except OSError:
        return None


def combined_digest(config_digest: str, files: Mapping[str, str | None]) -> str:
    """The config file's digest, folded with those of the files it reads (`${file:...}`,
    the token file): a rotated secret is a new config. Unchanged when it reads none."""
    if not files:
        return config_digest
    text = config_digest + "".join(f"\0{path}\0{files[path]}" for path in sorted(files))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class _TooBig(Exception):
    """A cap was hit while composing or measuring; aborts the parse with one problem."""

    def __init__(self, mark: yaml.Mark | None, message: str) -> None:
        super().__init__(message)
        self.line = mark.line + 1 if mark is not None else None
        self.message = message


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the caps enforced while the node graph is composed (the
    composer recurses once per level, so depth is checked before Python's own limit)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooBig(mark, f"more than {MAX_ALIASES} YAML aliases (*name)")
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooBig(mark, f"more than {MAX_NODES} values")
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooBig(mark, f"nested more than {MAX_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_SCALAR_CHARS:
            limit = MAX_SCALAR_CHARS // 1024
            raise _TooBig(node.start_mark, f"a value longer than {limit} KiB characters")
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _measure(root: yaml.Node) -> None:
    """Count the values and depth the tree expands to with every alias copied out, visiting
    each node once (iteratively: an alias chain may be deeper than Python's stack). Raises
    `_TooBig` past MAX_NODES or MAX_DEPTH, or for an alias inside its own anchor."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            active.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(kid)] for kid in kids)
            height[key] = 1 + max((height[id(kid)] for kid in kids), default=0)
            if size[key] > MAX_NODES:
                raise _TooBig(
                    node.start_mark,
                    f"expands to more than {MAX_NODES} values through YAML aliases",
                )
            if height[key] > MAX_DEPTH:
                raise _TooBig(
                    node.start_mark,
                    f"nested more than {MAX_DEPTH} levels deep through YAML aliases",
                )
            continue
        if key in size:
            continue
        if key in active:  # unfinished: an ancestor of itself
            raise _TooBig(node.start_mark, "a recursive YAML alias is not supported")
        active.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in size)


def parse_yaml(text: str, source: str) -> Document:
    """Parse one YAML document into plain dicts, lists and scalars, recording every line.

    Raises `ConfigInvalid` for YAML syntax errors (with the YAML's own line), a character
    YAML does not allow (NUL, other control characters) and a cap exceeded. Duplicate keys,
    non-scalar keys and unreadable scalars are collected as problems in the document.
    """
    doc = Document(source=source, data=None)
    if len(text) > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES // 1024
        raise ConfigInvalid([Problem(source, None, "", f"larger than {limit} KiB")])
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is not None:
            _measure(node)
            doc.lines[()] = node.start_mark.line + 1
            doc.data = _Walker(loader, doc).walk(node, ())
    except _TooBig as exc:
        raise ConfigInvalid([Problem(source, exc.line, "", exc.message)]) from None
    except yaml.reader.ReaderError as exc:
        reader_line = text.count("\n", 0, max(exc.position, 0)) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        message = (
            f"contains the control character U+{char:04X}, which YAML does not allow "
            "(only tab, CR and LF)"
        )
        raise ConfigInvalid([Problem(source, reader_line, "", message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        line = mark.line + 1 if mark is not None else None
        raise ConfigInvalid([Problem(source, line, "", f"YAML syntax error: {message}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigInvalid([Problem(source, None, "", f"YAML syntax error: {exc}")]) from None
    except RecursionError:  # a backstop: the depth cap should stop any nesting first
        message = f"nested too deeply (at most {MAX_DEPTH} levels)"
        raise ConfigInvalid([Problem(source, None, "", message)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc


class _Walker:
    """Builds the plain tree from composed YAML nodes (anchors, aliases and `<<` included).

    Each node is built once: an alias site gets the anchor's value (the same object) and
    `doc.aliases` points its path at the anchor's, for lines. `_measure` has already
    refused recursive aliases and bounded the size.
    """

    def __init__(self, loader: yaml.SafeLoader, doc: Document) -> None:
        self._loader = loader
        self._doc = doc
        self._built: dict[int, tuple[Path, Any]] = {}  # node → (first path, value)

    def walk(self, node: yaml.Node, path: Path) -> Any:
        built = self._built.get(id(node))
        if built is not None:
            if not isinstance(node, yaml.ScalarNode):
                self._doc.aliases[path] = built[0]
            return built[1]
        if isinstance(node, yaml.MappingNode):
            value: Any = self._mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            value = []
            for index, item in enumerate(node.value):
                self._doc.lines[(*path, index)] = item.start_mark.line + 1
                value.append(self.walk(item, (*path, index)))
        else:
            value = self._scalar(node, path)
        self._built[id(node)] = (path, value)
        return value

    def _scalar(self, node: yaml.Node, path: Path) -> Any:
        try:
            return self._loader.construct_object(node, deep=True)
        except (ValueError, OverflowError, yaml.YAMLError) as exc:
            self._loader.recursive_objects.pop(node, None)  # left behind by the failure
            self._doc.problem(path, _unreadable(node, exc))
            return None

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


def _unreadable(node: yaml.Node, exc: Exception) -> str:
    tag = str(node.tag).rpartition(":")[2]
    if tag == "int":
        return "an integer with too many digits (at most 4300)"
    if tag == "timestamp":
        return "not a valid date or time; quote it to make it a string"
    if isinstance(exc, yaml.constructor.ConstructorError):
        return f"unsupported YAML tag {node.tag}"
    return f"cannot read this {tag or 'value'}"


def expand_env(doc: Document, env: Mapping[str, str], base_dir: str | None = None) -> None:
    """Replace `${VAR}` / `${VAR:-default}` / `${file:PATH}` in every string scalar of
    `doc.data`, in place (relative PATHs start at `base_dir`, else the working directory).

    Shell semantics: `${VAR:-default}` uses the default when VAR is unset or empty; `${VAR}`
    with VAR unset is a problem naming VAR and the key. A result containing CR, LF or NUL
    is a problem (a variable must not smuggle in a header line). Records which paths took
    text from the environment (`env_vars`, for redaction), which had a reference expand to
    "" (`empty_vars`, to omit such injected headers), and the secret values themselves.

    `${file:PATH}` is the file's trimmed content (a Kubernetes mounted Secret): always a
    secret, its path in `file_vars`; a missing or unreadable file is a problem naming both.
    The tree is rebuilt: values shared by aliases become copies.
    """
    base = os.getcwd() if base_dir is None else base_dir
    doc.data = _expand_node(doc, doc.data, (), env, base)


def _expand_node(doc: Document, node: Any, path: Path, env: Mapping[str, str], base: str) -> Any:
    if isinstance(node, dict):
        return {
            key: _expand_node(doc, value, (*path, key), env, base) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_expand_node(doc, value, (*path, i), env, base) for i, value in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        return _expand_scalar(doc, node, path, env, base)
    return node


def _expand_scalar(doc: Document, text: str, path: Path, env: Mapping[str, str], base: str) -> str:
    used: list[str] = []
    missing: list[str] = []
    unreadable: list[str] = []
    empty = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal empty
        if match.group(1) is not None:
            return read_file(match.group(1).strip())
        name, default = match.group(2), match.group(3)
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

    def read_file(written: str) -> str:
        nonlocal empty
        full = os.path.normpath(os.path.join(base, os.path.expanduser(written)))
        try:
            value = doc.read_file(full)
        except ValueError as exc:
            unreadable.append(f"cannot read ${{file:{written}}} ({full}): {exc}")
            return ""
        doc.file_vars.add(path)
        used.append(f"file:{written}")
        if value:
            doc.secrets.add(value)
            doc.file_secrets.add(value)
        else:
            empty = True
        return value

    if "${" in ENV_REFERENCE.sub("", text):
        doc.problem(
            path,
            "malformed variable reference: write ${NAME}, ${NAME:-default} (NAME: A-Z, 0-9, _) "
            "or ${file:PATH}",
        )
        return text
    result = ENV_REFERENCE.sub(substitute, text)
    doc.expanded.add(path)
    for name in missing:
        doc.problem(
            path,
            f"environment variable {name} is not set "
            f"(write ${{{name}:-}} to make it optional, or ${{{name}:-DEFAULT}})",
        )
    for message in unreadable:
        doc.problem(path, message)
    if missing or unreadable:
        return result
    if len(result) > MAX_SCALAR_CHARS:
        doc.problem(path, f"longer than {MAX_SCALAR_CHARS // 1024} KiB characters once expanded")
        return result[:MAX_SCALAR_CHARS]
    if used:
        doc.env_vars[path] = tuple(used)
    if empty:
        doc.empty_vars.add(path)
    if any(char in result for char in _CONTROL):
        names = ", ".join(f"${{{name}}}" for name in used) or "its variables"
        doc.problem(path, f"contains a control character (CR, LF or NUL) after expanding {names}")
    return result

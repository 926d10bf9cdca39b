"""Breaker state on disk, so a restart does not forget an open breaker or an operator's force.

The file is JSON tagged `"format": "resilience-proxy/breakers/v1"`, written atomically
(temp file in the same directory, fsync, rename, fsync of the directory) with mode 0600.
A missing file is normal; a corrupt or foreign one is a warning, never fatal: the proxy
then starts with every breaker closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.resilience.breaker import Breaker

__all__ = ["FORMAT", "breakers_state", "load_state", "restore_breakers", "save_state"]

FORMAT = "resilience-proxy/breakers/v1"
_MAX_BYTES = 16 * 1024 * 1024  # far above any real state; refuses a wrong path quickly


def save_state(path: str, data: Mapping[str, Any]) -> None:
    """Write `data` (plus the format marker) to `path` atomically, mode 0600; the parent
    directory is created with mode 0700 when missing. Raises OSError on failure; the old
    file, if any, is then left intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    payload = json.dumps({**data, "format": FORMAT}, indent=1, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """Read a state file: (data, None); (None, None) when there is none; (None, warning)
    when it cannot be read, is not JSON, or lacks our format marker."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read state file {path}: {exc.strerror or exc}"
    if len(raw) > _MAX_BYTES:
        return None, f"ignoring state file {path}: larger than {_MAX_BYTES} bytes"
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"ignoring corrupt state file {path}: {exc}"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, f"ignoring state file {path}: not a {FORMAT} file"
    return data, None


def breakers_state(breakers: Iterable[Breaker], wall_now: float) -> dict[str, Any]:
    """The document `save_state` writes: every breaker's `to_dict`, with the save time."""
    return {
        "saved_at": wall_now,
        "breakers": [breaker.to_dict(wall_now) for breaker in breakers],
    }


def restore_breakers(
    data: Mapping[str, Any], breakers: Mapping[tuple[str, str], Breaker], wall_now: float
) -> list[str]:
    """Restore each saved breaker into the live one with the same (route, upstream); saved
    breakers of routes that no longer exist are skipped. Returns warnings for bad entries."""
    warnings: list[str] = []
    entries = data.get("breakers")
    if not isinstance(entries, list):
        return ["state file has no breakers list"]
    for entry in entries:
        if not isinstance(entry, dict):
            warnings.append(f"ignoring a breaker state entry of type {type(entry).__name__}")
            continue
        breaker = breakers.get((str(entry.get("route")), str(entry.get("upstream"))))
        if breaker is None:
            continue
        try:
            breaker.restore(entry, wall_now)
        except ValueError as exc:
            warnings.append(str(exc))
    return warnings

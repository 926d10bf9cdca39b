"""Durations, sizes and ratios as people write them in the YAML.

- Durations `250ms`, `2s`, `5m`, `1h` → float seconds; a bare number is seconds.
- Sizes `512KiB`, `10MiB`, `1GiB` (binary), `64KB`, `10MB`, `1GB` (decimal), `100B` → int
  bytes; a bare number is bytes.
- Ratios `50%` or `0.5` → float in [0, 1].

Every parser raises `ValueError` whose message quotes the bad value and shows the accepted
spellings, so a config problem reads "not a duration: '5x' (use 250ms, 2s, 5m, 1h)".
"""

from __future__ import annotations

import math
import re

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"

DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}

# The same grammar as JSON Schema patterns, so editors flag what the loader would refuse.
DURATION_PATTERN = rf"^\s*{_NUMBER}\s*(ms|s|m|h)?\s*$"
SIZE_PATTERN = rf"^\s*{_NUMBER}\s*([bB]|[kKmMgG][iI]?[bB])?\s*$"
RATIO_PATTERN = rf"^\s*{_NUMBER}\s*%?\s*$"

_DURATION_RE = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h)?\s*")
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([a-zA-Z]*)\s*")
_RATIO_RE = re.compile(rf"\s*({_NUMBER})\s*(%?)\s*")

DURATION_HINT = "use 250ms, 2s, 5m, 1h; a bare number is seconds"
SIZE_HINT = "use 512KiB, 10MiB, 1GiB, 64KB, 10MB; a bare number is bytes"
RATIO_HINT = "use 50% or 0.5"


def quote(value: object) -> str:
    """How a config value is shown in a message: strings quoted, YAML spellings otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _plain_number(value: object) -> float | None:
    """An int/float that is not a bool (YAML `true` must not read as 1 second)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_duration(value: object) -> float:
    """`250ms` → 0.25; `2s`, `2` or `2.0` → 2.0; `5m` → 300.0; `1h` → 3600.0 (seconds)."""
    number = _plain_number(value)
    if number is None and isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match:
            number = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if number is None or not math.isfinite(number):
        raise ValueError(f"not a duration: {quote(value)} ({DURATION_HINT})")
    if number < 0:
        raise ValueError(f"must not be negative, got {quote(value)}")
    return number


def parse_size(value: object) -> int:
    """`512KiB` → 524288, `10MB` → 10000000, `100` → 100 (bytes); units are case-insensitive."""
    number = _plain_number(value)
    if number is None and isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        unit = match.group(2).lower() or "b" if match else ""
        if match and unit in SIZE_UNITS:
            number = float(match.group(1)) * SIZE_UNITS[unit]
    if number is None or not math.isfinite(number):
        raise ValueError(f"not a size: {quote(value)} ({SIZE_HINT})")
    if number < 0:
        raise ValueError(f"must not be negative, got {quote(value)}")
    if number != int(number):
        raise ValueError(f"not a whole number of bytes: {quote(value)}")
    return int(number)


def parse_ratio(value: object) -> float:
    """`50%` → 0.5, `0.5` → 0.5; the result lies in [0, 1]."""
    number = _plain_number(value)
    percent = False
    if number is None and isinstance(value, str):
        match = _RATIO_RE.fullmatch(value)
        if match:
            percent = match.group(2) == "%"
            number = float(match.group(1)) / (100.0 if percent else 1.0)
    if number is None or not math.isfinite(number):
        raise ValueError(f"not a ratio: {quote(value)} ({RATIO_HINT})")
    if not 0.0 <= number <= 1.0:
        bounds = "0% and 100%" if percent else "0 and 1 (or 0% and 100%)"
        raise ValueError(f"must be between {bounds}, got {quote(value)}")
    return number


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for messages: 0.001 → `1ms`, 600 → `10m`."""
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """The shortest exact binary spelling of a size, for messages: 2097152 → `2MiB`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"

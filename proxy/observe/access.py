"""Request IDs, trace IDs and the access log (DESIGN §13).

- A request's ID is the client's `X-Request-Id` when it is 1–128 visible ASCII characters,
  else 16 random bytes from the injected rng, as 32 hex digits.
- The trace ID is the 32-hex `trace-id` of a W3C `traceparent` (`00-<trace>-<span>-<flags>`);
  the header itself passes through untouched.
- `access_log: {enabled, sample, slow}`: one JSON line per finished request, through the
  JSON logger (event `access`). A request is logged when it failed (status >= 500, or an
  outcome other than `ok` / `upstream-status`), or when it took at least `slow` seconds
  and falls in the `sample` share. The path is logged without its query; the logger
  scrubs secrets from every line. When disabled, the compiled runtime holds no
  `AccessLog` and the request path does no work for it.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.clock import Rng
from proxy.config.model import AccessLogSettings
from proxy.observe import log

MAX_REQUEST_ID = 128
_QUIET_OUTCOMES = frozenset(("ok", "upstream-status"))


def client_request_id(value: str | None) -> str | None:
    """The client's X-Request-Id when usable: 1–128 characters in 0x21–0x7E."""
    if value is None or not 0 < len(value) <= MAX_REQUEST_ID:
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        return None
    return value


def new_request_id(rng: Rng) -> str:
    """16 random bytes as 32 lower-case hex digits."""
    return f"{rng.getrandbits(128):032x}"


def trace_id(traceparent: str | None) -> str | None:
    """The trace-id of a W3C traceparent header, or None when absent or malformed."""
    if traceparent is None:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    trace = parts[1].lower()
    if trace == "0" * 32 or not all(c in "0123456789abcdef" for c in trace):
        return None
    return trace


class AccessLog:
    """Decides which finished requests are logged, and logs them."""

    __slots__ = ("rng", "sample", "slow")

    def __init__(self, settings: AccessLogSettings, rng: Rng) -> None:
        self.sample = settings.sample
        self.slow = settings.slow
        self.rng = rng

    @classmethod
    def build(cls, settings: AccessLogSettings, rng: Rng) -> AccessLog | None:
        return cls(settings, rng) if settings.enabled else None

    def wanted(self, status: int, outcome: str, duration: float) -> bool:
        if status >= 500 or outcome not in _QUIET_OUTCOMES:
            return True  # errors are always logged
        if duration < self.slow:
            return False
        sample = self.sample
        return sample >= 1.0 or (sample > 0.0 and self.rng.uniform(0.0, 1.0) < sample)

    def emit(self, fields: dict[str, Any]) -> None:
        log.emit(logging.INFO, "access", **fields)

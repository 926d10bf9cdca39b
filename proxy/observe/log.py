"""Structured logs: one JSON object per line on stderr (DESIGN §10).

Callers pass an event name and fields; the formatter adds time and level. Values listed as
secrets (injected header values, `${VAR}` values, passwords, the token) are scrubbed from
every line defensively, even though callers never pass them on purpose.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from proxy.observe.events import (
    BreakerTransitioned,
    ConfigReloaded,
    Event,
    FailedOver,
    PgStatusChanged,
    RetryScheduled,
    StateBackendChanged,
)

LOGGER_NAME = "resilience_proxy"
log = logging.getLogger(LOGGER_NAME)

_secrets: frozenset[str] = frozenset()


def set_secrets(secrets: frozenset[str]) -> None:
    """Values that must never appear in a log line (only those of 4+ characters are scrubbed)."""
    global _secrets
    _secrets = frozenset(s for s in secrets if len(s) >= 4)


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "<redacted>")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return scrub(json.dumps(entry, default=str, separators=(",", ":")))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's own loggers: keep their warnings, in our format; no access log.
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio"):
        other = logging.getLogger(name)
        other.handlers[:] = [handler]
        other.setLevel(logging.ERROR if name == "aiohttp.server" else logging.WARNING)
        other.propagate = False
    logging.getLogger("aiohttp.access").disabled = True


def emit(level: int, event: str, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, event, extra={"fields": fields})


def info(event: str, **fields: Any) -> None:
    emit(logging.INFO, event, **fields)


def warning(event: str, **fields: Any) -> None:
    emit(logging.WARNING, event, **fields)


def error(event: str, **fields: Any) -> None:
    emit(logging.ERROR, event, **fields)


def on_event(event: Event) -> None:
    """Log lines for state changes; subscribed to the event bus."""
    if isinstance(event, BreakerTransitioned):
        level = logging.WARNING if event.to_state in ("open", "forced_open") else logging.INFO
        emit(
            level,
            "breaker_transitioned",
            route=event.route,
            upstream=event.upstream,
            from_state=event.from_state,
            to_state=event.to_state,
            reason=event.reason,
            open_for=event.open_for or None,
        )
    elif isinstance(event, ConfigReloaded):
        if event.result == "error":
            emit(
                logging.ERROR,
                "config_reload_failed",
                trigger=event.trigger,
                problems=list(event.problems),
            )
        else:
            emit(
                logging.INFO,
                "config_reloaded",
                trigger=event.trigger,
                result=event.result,
                hash=event.hash[:12],
            )
    elif isinstance(event, PgStatusChanged):
        level = logging.WARNING if event.to_status in ("degraded", "critical") else logging.INFO
        emit(
            level,
            "pg_status_changed",
            target=event.target,
            from_status=event.from_status,
            to_status=event.to_status,
            reason=event.reason,
        )
    elif isinstance(event, StateBackendChanged):
        if event.up:
            emit(logging.INFO, "state_backend_up", backend=event.backend, where=event.where)
        else:
            emit(
                logging.WARNING,
                "state_backend_down",
                backend=event.backend,
                where=event.where,
                error=event.error,
                peers=event.peers,
                note="shared limits enforced locally at rps / peers until it returns",
            )
    elif isinstance(event, RetryScheduled):
        emit(
            logging.INFO,
            "retry",
            route=event.route,
            attempt=event.attempt,
            reason=event.reason,
            wait=round(event.wait, 3),
        )
    elif isinstance(event, FailedOver):
        # Skipping a refusing target happens on every request of an outage: debug only
        # (failovers_total counts it); a hop after a failed attempt is worth a line.
        skip = event.reason in ("breaker-open", "quota")
        emit(
            logging.DEBUG if skip else logging.INFO,
            "failover",
            route=event.route,
            from_upstream=event.from_upstream,
            to_upstream=event.to_upstream,
            reason=event.reason,
        )

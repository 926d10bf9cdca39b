"""State-change events: breaker transitions, reloads, probe results and status changes.

Producers (breakers, the config store, the Postgres prober) call `EventBus.emit` with one of
these frozen records; subscribers (metrics, logs) turn them into gauges, counters and log
lines. Producers never import `prometheus_client` or the logging setup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BreakerTransitioned:
    route: str
    upstream: str
    from_state: str  # closed | open | half_open | forced_open | forced_closed | disabled
    to_state: str
    reason: str  # e.g. "consecutive-failures", "failure-rate", "slow-call-rate",
    # "half-open-failed", "half-open-timeout", "half-open-succeeded", "open-expired",
    # "operator", "restored"
    open_for: float = 0.0  # the open period now in force (seconds), when to_state is open


@dataclass(frozen=True, slots=True)
class ConfigReloaded:
    result: str  # ok | error | unchanged
    trigger: str  # signal | admin | file-change | start
    hash: str = ""
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PgProbed:
    target: str
    ok: bool
    duration: float  # seconds, acquire + query
    reason: str = ""  # failure class when not ok: timeout | connect | auth | query | other


@dataclass(frozen=True, slots=True)
class PgStatusChanged:
    target: str
    from_status: str  # unknown | ok | degraded | critical
    to_status: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    route: str
    attempt: int  # the attempt about to be made (2 = first retry)
    reason: str  # the `on` token that matched
    wait: float  # seconds


@dataclass(frozen=True, slots=True)
class StateBackendChanged:
    """The fleet state backend became reachable (`up`) or stopped being so (DESIGN §15)."""

    backend: str  # local | redis
    up: bool
    where: str = ""  # the backend's address, password redacted
    error: str = ""  # the error class that took it down (never a message with a URL)
    peers: int = 1  # live sidecars last seen: shared limits are enforced at rps ÷ peers


@dataclass(frozen=True, slots=True)
class StateBackendErrored:
    """One failed (or timed-out) call to the state backend; the request went on regardless."""

    backend: str
    op: str  # take | heartbeat | put-quota | get-quota | publish-trip | subscribe | probe


@dataclass(frozen=True, slots=True)
class FailedOver:
    """An attempt of a request went to another target than the one before (DESIGN §16)."""

    route: str
    from_upstream: str
    to_upstream: str
    reason: str  # the failover `on` token: breaker-open, quota, connect-failure, 5xx, ...


Event = (
    BreakerTransitioned
    | ConfigReloaded
    | PgProbed
    | PgStatusChanged
    | RetryScheduled
    | FailedOver
    | StateBackendChanged
    | StateBackendErrored
)


class EventBus:
    """Synchronous fan-out of events to subscribers; a failing subscriber never breaks
    the producer."""

    __slots__ = ("_subscribers",)

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        self._subscribers.append(fn)

    def emit(self, event: Event) -> None:
        for fn in self._subscribers:
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - observers must not break producers
                pass


NULL_BUS = EventBus()

"""Grading a Postgres target from its probe results: pure, synchronous, no I/O.

One probe gives a *raw* grade from the thresholds (DESIGN §7):

- critical: consecutive failures >= critical.consecutive_failures,
  or utilization >= critical.utilization;
- degraded: consecutive failures >= degraded.consecutive_failures,
  or latency >= degraded.latency, or utilization >= degraded.utilization;
- ok otherwise.

`HealthTracker` turns raw grades into the reported status with hysteresis: stepping up in
severity is immediate, stepping down needs `RECOVERY_PROBES` (2) probes in a row graded
below the current status, so a flapping database does not flap alerts. Before the first
probe the status is `unknown` (readiness treats it as pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from proxy.config.model import PostgresTarget

Status = Literal["unknown", "ok", "degraded", "critical"]

SEVERITY: Final[dict[Status, int]] = {"unknown": -1, "ok": 0, "degraded": 1, "critical": 2}
"""Order used for the hysteresis: higher is worse; `unknown` is below everything."""

RECOVERY_PROBES: Final = 2
"""Probes in a row graded below the current status before the status steps down."""

# Reason tokens (also the `reason` of `PgStatusChanged`).
REASON_NOT_PROBED: Final = "not-probed"
REASON_CONSECUTIVE_FAILURES: Final = "consecutive-failures"
REASON_UTILIZATION: Final = "utilization"
REASON_LATENCY: Final = "latency"
REASON_OK: Final = "ok"
REASON_RECOVERED: Final = "recovered"  # a step down to ok


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The grading limits of one target; latency in seconds, utilization as 0..1."""

    degraded_latency: float
    degraded_utilization: float
    degraded_consecutive_failures: int
    critical_utilization: float
    critical_consecutive_failures: int

    @classmethod
    def from_target(cls, target: PostgresTarget) -> Thresholds:
        return cls(
            degraded_latency=target.degraded_latency,
            degraded_utilization=target.degraded_utilization,
            degraded_consecutive_failures=target.degraded_consecutive_failures,
            critical_utilization=target.critical_utilization,
            critical_consecutive_failures=target.critical_consecutive_failures,
        )


@dataclass(frozen=True, slots=True)
class Grade:
    """A status with the token that explains it and a sentence for people."""

    status: Status
    reason: str
    detail: str = ""


UNKNOWN: Final = Grade("unknown", REASON_NOT_PROBED, "no probe has completed yet")


def grade(
    thresholds: Thresholds,
    *,
    consecutive_failures: int,
    latency: float | None,
    utilization: float | None,
) -> Grade:
    """The raw grade of one probe: the most severe matching rule, checked in the order
    consecutive failures, utilization, latency. `None` latency or utilization (a failed
    probe, unread counts) matches no rule."""
    th = thresholds
    if consecutive_failures >= th.critical_consecutive_failures:
        return Grade(
            "critical",
            REASON_CONSECUTIVE_FAILURES,
            f"{consecutive_failures} consecutive failed probes"
            f" (critical at {th.critical_consecutive_failures})",
        )
    if utilization is not None and utilization >= th.critical_utilization:
        return Grade(
            "critical",
            REASON_UTILIZATION,
            f"utilization {utilization:.0%} >= {th.critical_utilization:.0%}",
        )
    if consecutive_failures >= th.degraded_consecutive_failures:
        return Grade(
            "degraded",
            REASON_CONSECUTIVE_FAILURES,
            f"{consecutive_failures} consecutive failed probes"
            f" (degraded at {th.degraded_consecutive_failures})",
        )
    if utilization is not None and utilization >= th.degraded_utilization:
        return Grade(
            "degraded",
            REASON_UTILIZATION,
            f"utilization {utilization:.0%} >= {th.degraded_utilization:.0%}",
        )
    if latency is not None and latency >= th.degraded_latency:
        return Grade(
            "degraded",
            REASON_LATENCY,
            f"probe took {latency * 1000:.0f}ms >= {th.degraded_latency * 1000:.0f}ms",
        )
    return Grade("ok", REASON_OK, "")


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of the reported status, as `PgStatusChanged` carries it."""

    from_status: Status
    to_status: Status
    reason: str


class HealthTracker:
    """The reported status of one target, fed one probe result at a time.

    `record` counts consecutive failures (reset by a success), grades the probe, and applies
    the hysteresis: a raw grade worse than the status replaces it at once; a grade equal to
    it refreshes the reason; `RECOVERY_PROBES` grades in a row below it step the status down
    to the worst of those grades.
    """

    __slots__ = ("_current", "_recovery", "_recovery_worst", "consecutive_failures", "probes")

    def __init__(self) -> None:
        self._current: Grade = UNKNOWN
        self._recovery = 0  # probes in a row graded below the current status
        self._recovery_worst: Grade | None = None
        self.consecutive_failures = 0
        self.probes = 0

    @property
    def status(self) -> Status:
        return self._current.status

    @property
    def current(self) -> Grade:
        return self._current

    @property
    def recovering(self) -> int:
        """Good probes seen so far towards stepping down (0 when not stepping down)."""
        return self._recovery

    def record(
        self,
        thresholds: Thresholds,
        *,
        ok: bool,
        latency: float | None = None,
        utilization: float | None = None,
    ) -> Transition | None:
        """Account one probe; return the status change it caused, if any.

        `latency` (seconds) and `utilization` (0..1) are only graded for successful probes.
        """
        self.probes += 1
        if ok:
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            latency = utilization = None
        raw = grade(
            thresholds,
            consecutive_failures=self.consecutive_failures,
            latency=latency,
            utilization=utilization,
        )
        before = self._current
        raw_sev, cur_sev = SEVERITY[raw.status], SEVERITY[before.status]
        if raw_sev >= cur_sev:
            self._current = raw
            self._recovery, self._recovery_worst = 0, None
        else:
            self._recovery += 1
            worst = self._recovery_worst
            if worst is None or SEVERITY[raw.status] >= SEVERITY[worst.status]:
                self._recovery_worst = raw
            if self._recovery >= RECOVERY_PROBES:
                assert self._recovery_worst is not None
                self._current = self._recovery_worst
                self._recovery, self._recovery_worst = 0, None
        if self._current.status == before.status:
            return None
        reason = self._current.reason
        if self._current.status == "ok" and before.status != "unknown":
            reason = REASON_RECOVERED
        return Transition(before.status, self._current.status, reason)

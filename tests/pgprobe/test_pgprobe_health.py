"""Grading and hysteresis, fed scripted probe results (no database, no time)."""

from __future__ import annotations

import pytest

from proxy.config.model import PostgresTarget
from proxy.pgprobe.health import (
    RECOVERY_PROBES,
    HealthTracker,
    Thresholds,
    Transition,
    grade,
)

TH = Thresholds(
    degraded_latency=0.5,
    degraded_utilization=0.8,
    degraded_consecutive_failures=1,
    critical_utilization=0.95,
    critical_consecutive_failures=3,
)


def ok(
    tracker: HealthTracker, latency: float = 0.01, util: float | None = 0.1
) -> Transition | None:
    return tracker.record(TH, ok=True, latency=latency, utilization=util)


def fail(tracker: HealthTracker) -> Transition | None:
    return tracker.record(TH, ok=False, latency=5.0)


@pytest.mark.parametrize(
    ("failures", "latency", "util", "status", "reason"),
    [
        (0, 0.01, 0.1, "ok", "ok"),
        (0, None, None, "ok", "ok"),
        (0, 0.5, 0.1, "degraded", "latency"),  # at the threshold counts
        (0, 0.01, 0.8, "degraded", "utilization"),
        (0, 0.01, 0.95, "critical", "utilization"),
        (1, None, None, "degraded", "consecutive-failures"),
        (2, None, None, "degraded", "consecutive-failures"),
        (3, None, None, "critical", "consecutive-failures"),
        (3, 0.9, 0.99, "critical", "consecutive-failures"),  # failures explain first
        (1, None, 0.97, "critical", "utilization"),  # the most severe rule wins
        (0, 0.9, 0.85, "degraded", "utilization"),
    ],
)
def test_grade_applies_the_most_severe_matching_rule(
    failures: int, latency: float | None, util: float | None, status: str, reason: str
) -> None:
    g = grade(TH, consecutive_failures=failures, latency=latency, utilization=util)
    assert (g.status, g.reason) == (status, reason)


def test_grade_detail_names_the_value_and_the_limit() -> None:
    g = grade(TH, consecutive_failures=0, latency=0.75, utilization=None)
    assert g.detail == "probe took 750ms >= 500ms"
    g = grade(TH, consecutive_failures=0, latency=0.0, utilization=0.96)
    assert g.detail == "utilization 96% >= 95%"


def test_status_is_unknown_until_the_first_probe_then_graded_at_once() -> None:
    tracker = HealthTracker()
    assert tracker.status == "unknown"
    assert tracker.current.reason == "not-probed"
    assert ok(tracker) == Transition("unknown", "ok", "ok")
    assert tracker.status == "ok"

    first_failure = HealthTracker()
    assert fail(first_failure) == Transition("unknown", "degraded", "consecutive-failures")


def test_failures_step_up_immediately_to_degraded_then_critical() -> None:
    tracker = HealthTracker()
    ok(tracker)
    assert fail(tracker) == Transition("ok", "degraded", "consecutive-failures")
    assert fail(tracker) is None
    assert tracker.consecutive_failures == 2
    assert fail(tracker) == Transition("degraded", "critical", "consecutive-failures")
    assert tracker.status == "critical"
    assert fail(tracker) is None  # stays critical, no repeated event


def test_stepping_down_needs_two_good_probes_in_a_row() -> None:
    assert RECOVERY_PROBES == 2
    tracker = HealthTracker()
    for _ in range(3):
        fail(tracker)
    assert tracker.status == "critical"

    assert ok(tracker) is None  # one good probe: still critical
    assert tracker.status == "critical"
    assert tracker.consecutive_failures == 0  # the failure streak itself is over
    assert tracker.recovering == 1
    assert ok(tracker) == Transition("critical", "ok", "recovered")
    assert tracker.recovering == 0


def test_a_failure_during_recovery_restarts_the_count() -> None:
    tracker = HealthTracker()
    ok(tracker)
    fail(tracker)
    assert tracker.status == "degraded"
    assert ok(tracker) is None
    assert fail(tracker) is None  # graded degraded again: not below the current status
    assert tracker.recovering == 0
    assert ok(tracker) is None
    assert tracker.status == "degraded"
    assert ok(tracker) == Transition("degraded", "ok", "recovered")


def test_step_down_lands_on_the_worst_grade_of_the_recovery_streak() -> None:
    tracker = HealthTracker()
    ok(tracker, util=0.99)
    assert tracker.status == "critical"
    assert ok(tracker, util=0.1) is None
    # Second probe below critical, but only to degraded: both say "better than
    # critical", only one says "ok", so the status steps to degraded.
    assert ok(tracker, util=0.85) == Transition("critical", "degraded", "utilization")
    assert ok(tracker, util=0.1) is None
    assert ok(tracker, util=0.1) == Transition("degraded", "ok", "recovered")


def test_utilization_and_latency_drive_the_status() -> None:
    tracker = HealthTracker()
    assert ok(tracker, util=0.5) == Transition("unknown", "ok", "ok")
    assert ok(tracker, util=0.85) == Transition("ok", "degraded", "utilization")
    assert ok(tracker, util=0.96) == Transition("degraded", "critical", "utilization")
    # The reason follows the latest grade at the same severity.
    fail(tracker)
    fail(tracker)
    fail(tracker)
    assert tracker.current.reason == "consecutive-failures"

    slow = HealthTracker()
    assert ok(slow, latency=0.7) == Transition("unknown", "degraded", "latency")
    ok(slow, latency=0.1)
    assert ok(slow, latency=0.1) == Transition("degraded", "ok", "recovered")


def test_a_failed_probe_is_not_graded_on_its_duration_or_stale_utilization() -> None:
    strict = Thresholds(0.5, 0.8, 5, 0.95, 10)  # failures matter only from 5 in a row
    tracker = HealthTracker()
    tracker.record(strict, ok=True, latency=0.01, utilization=0.1)
    change = tracker.record(strict, ok=False, latency=30.0, utilization=0.99)
    assert change is None
    assert tracker.status == "ok"
    assert tracker.consecutive_failures == 1


def test_changed_thresholds_apply_from_the_next_probe() -> None:
    tracker = HealthTracker()
    ok(tracker, util=0.7)
    assert tracker.status == "ok"
    tighter = Thresholds(0.5, 0.6, 1, 0.95, 3)
    assert tracker.record(tighter, ok=True, latency=0.01, utilization=0.7) == Transition(
        "ok", "degraded", "utilization"
    )


def test_thresholds_come_from_the_target() -> None:
    target = PostgresTarget(
        name="main",
        dsn="postgresql://x@h/db",
        display_dsn="postgresql://x@h/db",
        degraded_latency=0.25,
        degraded_utilization=0.7,
        degraded_consecutive_failures=2,
        critical_utilization=0.9,
        critical_consecutive_failures=4,
    )
    assert Thresholds.from_target(target) == Thresholds(0.25, 0.7, 2, 0.9, 4)

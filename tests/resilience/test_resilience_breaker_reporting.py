"""What the breaker reports to metrics and /status (DESIGN §9): open until a trial permit is
granted, when it opened, why, and how often it tripped; stepped on a fake clock."""

from __future__ import annotations

from proxy.clock import FakeClock
from proxy.config.model import BreakerPolicy
from proxy.resilience.breaker import Breaker, BreakerState
from proxy.resilience.classify import Attempt, AttemptResult

FAIL = Attempt(AttemptResult.CONNECT_FAILURE)
OK = Attempt.response(200)
POLICY = BreakerPolicy(consecutive_failures=2, open_for=10.0, half_open_calls=1)


def trip(breaker: Breaker) -> None:
    for _ in range(2):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, FAIL)


def test_open_is_reported_until_a_trial_permit_is_granted() -> None:
    clock = FakeClock()
    breaker = Breaker("r", "u", POLICY, clock)
    assert breaker.opened_at_wall() == 0.0
    trip(breaker)
    opened = clock.wall()
    assert breaker.reported_state() is BreakerState.OPEN
    assert breaker.opened_at_wall() == opened
    clock.advance(60.0)  # long past open_for, nobody calls: still reported open
    for _ in range(3):
        assert breaker.reported_state() is BreakerState.OPEN
        assert breaker.snapshot()["state"] == "open"
    assert breaker.snapshot()["seconds_until_half_open"] == 0.0
    assert breaker.state is BreakerState.HALF_OPEN  # internally the hold is over
    permit = breaker.acquire()
    assert permit is not None and permit.trial
    assert breaker.reported_state() is BreakerState.HALF_OPEN  # a trial is running
    assert breaker.opened_at_wall() == opened
    breaker.release(permit)  # a cancelled trial hands its permit back
    assert breaker.reported_state() is BreakerState.OPEN
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, OK)
    assert breaker.reported_state() is BreakerState.CLOSED
    assert breaker.opened_at_wall() == 0.0


def test_trip_reason_count_and_a_retrip_reopening_later() -> None:
    clock = FakeClock()
    breaker = Breaker("r", "u", POLICY, clock)
    trip(breaker)
    snap = breaker.snapshot()
    assert (snap["trips"], snap["trip_reason"]) == (1, "consecutive-failures")
    first = snap["opened_at"]
    clock.advance(11.0)
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, FAIL)  # the trial fails: open again, later
    snap = breaker.snapshot()
    assert (snap["trips"], snap["trip_reason"], snap["state"]) == (2, "half-open-failed", "open")
    assert snap["opened_at"] == first + 11.0


def test_forced_open_reports_its_time_and_the_operator() -> None:
    clock = FakeClock()
    breaker = Breaker("r", "u", POLICY, clock)
    breaker.force("forced_open")
    snap = breaker.snapshot()
    assert snap["state"] == "forced_open" and snap["trip_reason"] == "operator"
    assert snap["opened_at"] == clock.wall() and snap["trips"] == 0
    breaker.reset()
    assert breaker.snapshot()["opened_at"] is None

"""The breaker state machine, stepped on a FakeClock, asserting state and events after each step."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from proxy.clock import FakeClock
from proxy.config.model import BreakerPolicy, FailureRatePolicy, SlowCallPolicy, StatusSet
from proxy.observe.events import BreakerTransitioned, Event
from proxy.resilience.breaker import TRANSITIONS, Breaker, BreakerState, Permit
from proxy.resilience.classify import Attempt, AttemptResult

S = BreakerState
OK = Attempt.response(200, duration=0.1)
FAIL = Attempt.response(503, duration=0.1)
TIMEOUT = Attempt(AttemptResult.TIMEOUT, duration=10.0)

# Consecutive failures only, unless a test adds a window.
BASE = BreakerPolicy(
    consecutive_failures=3,
    failure_rate=None,
    open_for=60.0,
    open_for_max=600.0,
    half_open_calls=2,
    half_open_max_wait=30.0,
)


class Harness:
    def __init__(self, policy: BreakerPolicy = BASE, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.events: list[BreakerTransitioned] = []
        self.breaker = Breaker("hf", "huggingface", policy, self.clock, self._emit)

    def _emit(self, event: Event) -> None:
        assert isinstance(event, BreakerTransitioned)
        assert event.to_state in TRANSITIONS[BreakerState(event.from_state)], event
        self.events.append(event)

    def call(self, outcome: Attempt) -> bool:
        """One attempt through the breaker; False when it was rejected."""
        permit = self.breaker.acquire()
        if permit is None:
            return False
        self.breaker.record(permit, outcome)
        return True

    def moves(self) -> list[tuple[str, str, str]]:
        return [(e.from_state, e.to_state, e.reason) for e in self.events]

    def trip(self) -> None:
        for _ in range(3):
            self.call(FAIL)
        assert self.breaker.state is S.OPEN


def test_closed_opens_on_consecutive_failures() -> None:
    h = Harness()
    assert h.call(FAIL) and h.call(FAIL)
    assert h.breaker.state is S.CLOSED
    assert h.call(TIMEOUT)
    assert h.breaker.state is S.OPEN
    assert h.moves() == [("closed", "open", "consecutive-failures")]
    assert h.events[0].open_for == 60.0
    assert h.breaker.acquire() is None
    assert h.breaker.retry_after() == 60


def test_a_success_resets_the_consecutive_count() -> None:
    h = Harness()
    for outcome in (FAIL, FAIL, OK, FAIL, FAIL, OK, FAIL):
        h.call(outcome)
    assert h.breaker.state is S.CLOSED
    assert h.breaker.snapshot()["consecutive_failures"] == 1


def test_failure_classification() -> None:
    statuses = StatusSet(("5xx", "429"), frozenset(range(500, 600)) | {429})
    h = Harness(replace(BASE, consecutive_failures=1, failure_statuses=statuses))
    for outcome in (Attempt.response(404), Attempt.response(200), Attempt.response(302)):
        h.call(outcome)
    assert h.breaker.state is S.CLOSED
    for failure in (
        Attempt.response(429),
        Attempt.response(500),
        Attempt(AttemptResult.CONNECT_FAILURE),
        Attempt(AttemptResult.RESET),
        TIMEOUT,
    ):
        h.breaker.reset()
        h.call(failure)
        assert h.breaker.state is S.OPEN, failure


def test_failure_rate_over_a_time_window_needs_min_calls() -> None:
    rate = FailureRatePolicy(threshold=0.5, window=60.0, min_calls=10)
    h = Harness(replace(BASE, consecutive_failures=None, failure_rate=rate))
    for i in range(9):
        h.call(FAIL if i % 2 == 0 else OK)  # 5 of 9 failed: 55 %, but only 9 calls
    assert h.breaker.state is S.CLOSED
    h.call(OK)  # 5 of 10: 50 % reaches the threshold
    assert h.moves() == [("closed", "open", "failure-rate")]


def test_failure_rate_forgets_calls_that_left_the_time_window() -> None:
    rate = FailureRatePolicy(threshold=0.5, window=10.0, min_calls=4)
    h = Harness(replace(BASE, consecutive_failures=None, failure_rate=rate))
    h.call(FAIL)
    h.call(FAIL)
    h.clock.advance(10.0)
    h.call(FAIL)
    h.call(OK)
    h.call(OK)
    assert h.breaker.state is S.CLOSED  # 1 of 3 in the window
    h.call(OK)
    assert h.breaker.state is S.CLOSED  # 1 of 4 = 25 %
    h.call(FAIL)
    h.call(FAIL)
    assert h.breaker.state is S.OPEN  # 3 of 6 = 50 %


def test_failure_rate_over_a_count_window() -> None:
    rate = FailureRatePolicy(threshold=0.6, window=None, window_calls=5, min_calls=5)
    h = Harness(replace(BASE, consecutive_failures=None, failure_rate=rate))
    for outcome in (FAIL, FAIL, OK, OK, OK, FAIL, OK):  # the first two failures age out
        h.call(outcome)
    assert h.breaker.state is S.CLOSED  # the last five: OK OK OK FAIL OK = 20 %
    h.call(FAIL)
    assert h.breaker.state is S.CLOSED  # OK OK FAIL OK FAIL = 40 %
    h.call(FAIL)  # the last five: OK FAIL OK FAIL FAIL = 60 %
    assert h.moves() == [("closed", "open", "failure-rate")]


def test_slow_call_rate_trips_when_configured() -> None:
    rate = FailureRatePolicy(threshold=0.5, window=60.0, min_calls=4)
    slow = SlowCallPolicy(duration=2.0, threshold=0.75)
    h = Harness(replace(BASE, consecutive_failures=None, failure_rate=rate, slow_calls=slow))
    slow_ok = Attempt.response(200, duration=2.0)
    for outcome in (slow_ok, slow_ok, OK):
        h.call(outcome)
    assert h.breaker.state is S.CLOSED  # 2 of 3 slow, under min_calls
    h.call(Attempt.response(200, duration=1.9))
    assert h.breaker.state is S.CLOSED  # 2 of 4 slow = 50 %
    h.call(slow_ok)
    h.call(slow_ok)
    assert h.breaker.state is S.CLOSED  # 4 of 6 = 67 %
    h.call(slow_ok)
    assert h.breaker.state is S.CLOSED  # 5 of 7 = 71 %
    h.call(slow_ok)
    assert h.moves() == [("closed", "open", "slow-call-rate")]  # 6 of 8 = 75 %


def test_a_slow_trial_does_not_close_the_breaker() -> None:
    slow = SlowCallPolicy(duration=2.0, threshold=0.75)
    h = Harness(replace(BASE, slow_calls=slow))
    h.trip()
    h.clock.advance(60.0)
    h.call(OK)
    h.call(Attempt.response(200, duration=5.0))
    assert h.breaker.state is S.OPEN
    assert h.moves()[-1] == ("half_open", "open", "half-open-failed")


def test_open_becomes_half_open_after_open_for_and_closes_when_all_trials_succeed() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(59.9)
    assert h.breaker.acquire() is None
    assert h.breaker.retry_after() == 1
    h.clock.advance(0.1)
    first = h.breaker.acquire()
    second = h.breaker.acquire()
    assert first is not None and second is not None and first.trial and second.trial
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.acquire() is None  # half_open_calls = 2, both in use
    h.breaker.record(first, OK)
    assert h.breaker.acquire() is None  # a succeeded trial does not free a permit
    h.breaker.record(second, OK)
    assert h.breaker.state is S.CLOSED
    assert h.moves() == [
        ("closed", "open", "consecutive-failures"),
        ("open", "half_open", "open-expired"),
        ("half_open", "closed", "half-open-succeeded"),
    ]


def test_a_failed_trial_reopens_with_open_for_doubled_up_to_the_cap() -> None:
    h = Harness()
    h.trip()
    holds = []
    for _ in range(6):
        h.clock.advance(h.breaker.open_for)
        assert h.call(FAIL)
        assert h.breaker.state is S.OPEN
        holds.append(h.events[-1].open_for)
        assert h.breaker.retry_after() == int(holds[-1])
    assert holds == [120.0, 240.0, 480.0, 600.0, 600.0, 600.0]
    assert h.events[-1].reason == "half-open-failed"
    # Recovery: back to closed, and the next trip holds for the base period again.
    h.clock.advance(600.0)
    assert h.call(OK) and h.call(OK)
    assert h.breaker.state is S.CLOSED
    h.trip()
    assert h.events[-1].open_for == 60.0


def test_reset_clears_the_doubling() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    h.call(FAIL)
    assert h.breaker.open_for == 120.0
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED
    assert h.moves()[-1] == ("open", "closed", "operator")
    h.trip()
    assert h.events[-1].open_for == 60.0


def test_a_trial_that_outlives_half_open_max_wait_counts_as_failed() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    stuck = h.breaker.acquire()
    assert stuck is not None
    h.clock.advance(29.0)
    assert h.breaker.state is S.HALF_OPEN
    h.clock.advance(1.0)
    assert h.breaker.state is S.OPEN
    assert h.moves()[-1] == ("half_open", "open", "half-open-timeout")
    assert h.events[-1].open_for == 120.0
    # Its late success belongs to a past generation: dropped.
    h.breaker.record(stuck, OK)
    assert h.breaker.state is S.OPEN
    # The open period is dated from the trial's deadline, not from when it was noticed.
    h.clock.advance(119.0)
    assert h.breaker.acquire() is None
    h.clock.advance(1.0)
    assert h.breaker.acquire() is not None


def test_an_overdue_trial_noticed_late_owes_both_transitions() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    assert h.breaker.acquire() is not None
    h.clock.advance(1000.0)  # timeout at +30, then its 120 s hold also passed
    assert h.breaker.state is S.HALF_OPEN
    assert [m[2] for m in h.moves()[-2:]] == ["half-open-timeout", "open-expired"]


def test_a_released_trial_permit_can_be_granted_again() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    a, b = h.breaker.acquire(), h.breaker.acquire()
    assert a is not None and b is not None
    assert h.breaker.acquire() is None
    h.breaker.release(a)  # cancelled by the client: not a failure
    c = h.breaker.acquire()
    assert c is not None
    h.breaker.record(b, OK)
    h.breaker.record(c, OK)
    assert h.breaker.state is S.CLOSED


def test_outcomes_from_before_a_transition_are_dropped() -> None:
    h = Harness()
    early = h.breaker.acquire()
    assert early is not None
    h.trip()
    h.clock.advance(60.0)
    trial = h.breaker.acquire()
    assert trial is not None
    h.breaker.record(early, FAIL)  # began while closed: must not fail the half-open period
    assert h.breaker.state is S.HALF_OPEN
    h.breaker.release(early)  # harmless too
    assert h.breaker.snapshot()["half_open_permits_in_use"] == 1


def test_retry_after_failures_never_trip_a_closed_breaker_by_themselves() -> None:
    h = Harness()
    throttled = Attempt.response(429, retry_after=300.0)
    statuses = StatusSet(("429", "5xx"), frozenset({429} | set(range(500, 600))))
    h.breaker.update_policy(replace(BASE, failure_statuses=statuses))
    for _ in range(5):
        h.call(throttled)
    assert h.breaker.state is S.CLOSED
    assert h.breaker.snapshot()["consecutive_failures"] == 5
    h.call(FAIL)
    assert h.breaker.state is S.OPEN
    # The server asked for 300 s: the breaker holds that long, longer than open_for (60 s).
    assert h.breaker.retry_after() == 300
    h.clock.advance(299.0)
    assert h.breaker.acquire() is None
    h.clock.advance(1.0)
    assert h.breaker.acquire() is not None


def test_a_server_requested_hold_is_capped_by_open_for_max() -> None:
    h = Harness()
    h.call(FAIL)
    h.call(Attempt.response(503, retry_after=86_400.0))
    h.call(FAIL)
    h.call(FAIL)
    assert h.breaker.state is S.OPEN
    assert h.breaker.retry_after() == 600
    h.clock.advance(600.0)
    assert h.breaker.state is S.HALF_OPEN


def test_a_short_server_hold_does_not_shorten_open_for() -> None:
    h = Harness()
    h.call(Attempt.response(503, retry_after=5.0))
    h.trip()
    assert h.breaker.retry_after() == 60


def test_a_failed_trial_with_retry_after_holds_as_asked() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    h.call(Attempt.response(503, retry_after=400.0))
    assert h.breaker.state is S.OPEN
    assert h.breaker.retry_after() == 400  # more than the doubled 120 s


def test_observe_mode_transitions_but_never_rejects() -> None:
    h = Harness(replace(BASE, mode="observe"))
    h.trip()
    shadow = h.breaker.acquire()
    assert shadow is not None and shadow.shadow
    h.breaker.record(shadow, OK)  # would have been rejected: not recorded
    assert h.breaker.state is S.OPEN
    h.clock.advance(60.0)
    trials = [h.breaker.acquire(), h.breaker.acquire()]
    extra = h.breaker.acquire()
    assert extra is not None and extra.shadow
    for trial in trials:
        assert trial is not None and trial.trial
        h.breaker.record(trial, OK)
    assert [m[1] for m in h.moves()] == ["open", "half_open", "closed"]


def test_disabled_mode_records_nothing_and_always_permits() -> None:
    h = Harness(replace(BASE, mode="disabled"))
    assert h.breaker.state is S.DISABLED
    for _ in range(10):
        assert h.call(FAIL)
    assert h.events == []
    assert h.breaker.snapshot()["consecutive_failures"] == 0
    h.breaker.update_policy(BASE)  # reload to enforce
    assert h.moves() == [("disabled", "closed", "config")]
    h.breaker.update_policy(replace(BASE, mode="disabled"))
    assert h.moves()[-1] == ("closed", "disabled", "config")


def test_forced_open_rejects_until_reset() -> None:
    h = Harness(replace(BASE, mode="observe"))
    h.breaker.force("forced_open")
    assert h.breaker.acquire() is None  # an operator's force beats observe mode
    h.clock.advance(10_000.0)
    assert h.breaker.state is S.FORCED_OPEN
    assert h.breaker.retry_after() == 60
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED
    assert h.moves() == [
        ("closed", "forced_open", "operator"),
        ("forced_open", "closed", "operator"),
    ]


def test_forced_closed_records_but_never_trips() -> None:
    h = Harness(replace(BASE, failure_rate=FailureRatePolicy(window=60.0, min_calls=1)))
    h.trip()
    h.breaker.force(S.FORCED_CLOSED)
    for _ in range(10):
        assert h.call(FAIL)
    snap = h.breaker.snapshot()
    assert snap["state"] == "forced_closed" and snap["failure_rate"] == 1.0
    h.breaker.reset()
    snap = h.breaker.snapshot()
    assert snap["state"] == "closed" and snap["calls"] == 0 and snap["consecutive_failures"] == 0
    assert h.call(OK)
    assert h.breaker.state is S.CLOSED


def test_forced_disabled_survives_reloads_until_reset() -> None:
    h = Harness()
    h.breaker.force("disabled")
    for _ in range(5):
        h.call(FAIL)
    h.breaker.update_policy(replace(BASE, consecutive_failures=1))
    assert h.breaker.state is S.DISABLED
    h.breaker.reset()
    assert h.breaker.state is S.CLOSED


def test_only_forced_states_can_be_forced() -> None:
    h = Harness()
    with pytest.raises(ValueError):
        h.breaker.force("open")
    with pytest.raises(ValueError):
        h.breaker.force("ajar")


def test_the_transition_table_names_every_state_and_no_self_loops() -> None:
    assert set(TRANSITIONS) == set(BreakerState)
    for source, targets in TRANSITIONS.items():
        assert source not in targets
    assert S.HALF_OPEN not in TRANSITIONS[S.CLOSED]  # only time opens a trial period
    assert S.OPEN not in TRANSITIONS[S.FORCED_OPEN]  # forced states end only by reset


def test_every_transition_emits_exactly_one_event() -> None:
    h = Harness()
    h.trip()  # 1
    h.clock.advance(60.0)
    h.call(FAIL)  # 2 (half_open), 3 (open)
    h.breaker.force("forced_closed")  # 4
    h.breaker.force("forced_closed")  # no change, no event
    h.breaker.reset()  # 5
    h.breaker.reset()  # no change, no event
    assert len(h.events) == 5


def test_reload_keeps_state_and_resets_the_window_only_when_its_shape_changes() -> None:
    rate = FailureRatePolicy(threshold=0.9, window=60.0, min_calls=5)
    policy = replace(BASE, consecutive_failures=None, failure_rate=rate)
    h = Harness(policy)
    for _ in range(4):
        h.call(FAIL)
    h.breaker.update_policy(replace(policy, failure_rate=replace(rate, threshold=0.5)))
    assert h.breaker.snapshot()["calls"] == 4  # same shape: kept
    h.breaker.update_policy(replace(policy, failure_rate=replace(rate, window=30.0)))
    assert h.breaker.snapshot()["calls"] == 0  # new size: reset
    for _ in range(4):
        h.call(FAIL)
    counted = FailureRatePolicy(threshold=0.5, window=None, window_calls=30, min_calls=5)
    h.breaker.update_policy(replace(policy, failure_rate=counted))
    assert h.breaker.snapshot()["calls"] == 0  # new kind: reset
    h.breaker.update_policy(replace(policy, consecutive_failures=1))  # new threshold applies
    h.call(FAIL)
    assert h.breaker.state is S.OPEN
    h.breaker.update_policy(replace(policy, open_for=10.0))  # keeps the open state
    assert h.breaker.state is S.OPEN
    assert h.breaker.retry_after() == 10  # the hold follows the reloaded open_for


def test_snapshot_reports_what_status_shows() -> None:
    h = Harness()
    h.call(FAIL)
    snap = h.breaker.snapshot()
    assert snap["state"] == "closed" and snap["consecutive_failures"] == 1
    assert snap["seconds_until_half_open"] is None
    h.call(FAIL)
    h.call(FAIL)
    h.clock.advance(15.0)
    snap = h.breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["seconds_until_half_open"] == pytest.approx(45.0)
    assert snap["open_for"] == 60.0


def test_the_happy_path_allocates_no_permit() -> None:
    h = Harness()
    first, second = h.breaker.acquire(), h.breaker.acquire()
    assert first is second and isinstance(first, Permit)


# -- persistence -------------------------------------------------------------------------


def saved(h: Harness) -> dict[str, Any]:
    return h.breaker.to_dict(h.clock.wall())


def test_an_open_breaker_is_restored_open_for_the_rest_of_its_hold() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    h.call(FAIL)  # open_for doubled to 120
    h.clock.advance(20.0)
    data = saved(h)
    # A new process: another monotonic origin, 30 s of wall time later.
    later = FakeClock(start=5.0, wall_start=h.clock.wall() + 30.0)
    r = Harness(clock=later)
    r.breaker.restore(data, later.wall())
    assert r.breaker.state is S.OPEN
    assert r.moves() == [("closed", "open", "restored")]
    assert r.breaker.retry_after() == 70
    later.advance(70.0)
    assert r.breaker.acquire() is not None
    r.call(FAIL)
    assert r.events[-1].open_for == 240.0  # the doubling survived the restart


def test_an_open_breaker_whose_hold_expired_probes_on_its_first_call() -> None:
    h = Harness()
    h.trip()
    data = saved(h)
    later = FakeClock(wall_start=h.clock.wall() + 3600.0)
    r = Harness(clock=later)
    r.breaker.restore(data, later.wall())
    permit = r.breaker.acquire()
    assert permit is not None and permit.trial


@pytest.mark.parametrize("forced", ["forced_open", "forced_closed", "disabled"])
def test_forced_states_are_restored(forced: str) -> None:
    h = Harness()
    h.breaker.force(forced)
    r = Harness()
    r.breaker.restore(saved(h), r.clock.wall())
    assert r.breaker.state == forced
    assert r.moves() == [("closed", forced, "restored")]
    r.breaker.reset()
    assert r.breaker.state is S.CLOSED


def test_a_closed_breaker_restores_to_nothing_special() -> None:
    h = Harness()
    h.call(FAIL)
    r = Harness()
    r.breaker.restore(saved(h), r.clock.wall())
    assert r.breaker.state is S.CLOSED and r.events == []


def test_disabled_mode_wins_over_a_saved_open_state() -> None:
    h = Harness()
    h.trip()
    r = Harness(replace(BASE, mode="disabled"))
    r.breaker.restore(saved(h), r.clock.wall())
    assert r.breaker.state is S.DISABLED


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"state": "sideways"},
        {"state": "open"},
        {"state": "open", "opened_at": "yesterday"},
        {"state": "open", "opened_at": 1.0, "open_doublings": -1},
        {"state": "forced_open", "forced": "yes"},
    ],
)
def test_malformed_entries_raise_value_error(data: dict[str, Any]) -> None:
    h = Harness()
    with pytest.raises(ValueError):
        h.breaker.restore(data, h.clock.wall())
    assert h.breaker.state is S.CLOSED


def test_the_open_event_reports_the_hold_the_server_asked_for() -> None:
    h = Harness()
    h.call(Attempt.response(503, retry_after=200.0))
    h.trip()
    assert h.events[-1].open_for == 200.0


def test_admits_tells_what_acquire_would_answer_without_taking_a_permit() -> None:
    h = Harness()
    assert h.breaker.admits()
    h.trip()
    assert not h.breaker.admits()
    h.clock.advance(60.0)
    for _ in range(3):  # asking never uses up the half-open trial permits
        assert h.breaker.admits()
    first, second = h.breaker.acquire(), h.breaker.acquire()
    assert first is not None and second is not None and first.trial and second.trial
    assert not h.breaker.admits() and h.breaker.acquire() is None
    h.breaker.force("forced_open")
    assert not h.breaker.admits()

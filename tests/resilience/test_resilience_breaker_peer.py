"""`Breaker.trip_from_peer`: a peer sidecar's trip (DESIGN §15), stepped on a FakeClock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.observe.events import BreakerTransitioned
from proxy.resilience.breaker import BreakerState
from tests.resilience.test_resilience_breaker import BASE, FAIL, OK, Harness

S = BreakerState


def wall(h: Harness) -> float:
    return h.clock.wall()


def test_closed_opens_until_the_peers_time_then_runs_its_own_trials() -> None:
    h = Harness()
    assert h.breaker.trip_from_peer(wall(h) + 20.0, wall(h)) is True
    assert h.breaker.state is S.OPEN
    assert h.moves() == [("closed", "open", "peer")]
    assert h.events[-1].open_for == pytest.approx(20.0)
    assert h.breaker.acquire() is None  # rejects like any open breaker
    assert h.breaker.retry_after() == 20
    h.clock.advance(19.9)
    assert h.breaker.state is S.OPEN
    h.clock.advance(0.2)  # the peer's hold is over: our own half-open trials
    assert h.call(OK) and h.call(OK)
    assert h.breaker.state is S.CLOSED
    assert h.moves()[-2:] == [
        ("open", "half_open", "open-expired"),
        ("half_open", "closed", "half-open-succeeded"),
    ]


def test_a_peer_hold_shorter_than_open_for_is_kept_and_not_doubled() -> None:
    h = Harness()
    h.breaker.trip_from_peer(wall(h) + 5.0, wall(h))
    h.clock.advance(5.0)
    assert h.breaker.state is S.HALF_OPEN
    assert h.breaker.open_for == BASE.open_for  # a peer's trip is not a re-trip
    assert h.call(FAIL)  # our own trial fails: a local re-trip, doubled
    assert h.breaker.state is S.OPEN
    assert h.events[-1].reason == "half-open-failed"
    assert h.events[-1].open_for == pytest.approx(2 * BASE.open_for)


def test_half_open_opens_on_a_peer_trip_and_drops_its_trials() -> None:
    h = Harness()
    h.trip()
    h.clock.advance(60.0)
    permit = h.breaker.acquire()
    assert permit is not None and permit.trial and h.breaker.state is S.HALF_OPEN
    assert h.breaker.trip_from_peer(wall(h) + 30.0, wall(h)) is True
    assert h.breaker.state is S.OPEN
    h.breaker.record(permit, OK)  # the old trial's outcome belongs to an earlier generation
    assert h.breaker.state is S.OPEN
    assert h.moves()[-1] == ("half_open", "open", "peer")


def test_an_open_breaker_keeps_its_own_hold() -> None:
    h = Harness()
    h.trip()
    before = len(h.events)
    assert h.breaker.trip_from_peer(wall(h) + 500.0, wall(h)) is False
    assert len(h.events) == before
    h.clock.advance(60.0)
    assert h.breaker.state is S.HALF_OPEN  # not 500 s


@pytest.mark.parametrize("forced", ["forced_closed", "forced_open", "disabled"])
def test_forced_and_disabled_states_are_never_overridden(forced: str) -> None:
    h = Harness()
    h.breaker.force(forced)
    before = len(h.events)
    assert h.breaker.trip_from_peer(wall(h) + 30.0, wall(h)) is False
    assert h.breaker.state is S(forced)
    assert len(h.events) == before


def test_mode_disabled_is_left_alone() -> None:
    h = Harness(replace(BASE, mode="disabled"))
    assert h.breaker.trip_from_peer(wall(h) + 30.0, wall(h)) is False
    assert h.breaker.state is S.DISABLED


@pytest.mark.parametrize("until_offset", [0.0, -5.0, float("nan"), float("-inf")])
def test_an_expired_or_bogus_hold_is_ignored(until_offset: float) -> None:
    h = Harness()
    assert h.breaker.trip_from_peer(wall(h) + until_offset, wall(h)) is False
    assert h.breaker.state is S.CLOSED
    assert h.events == []


def test_a_peer_cannot_hold_beyond_open_for_max() -> None:
    h = Harness()
    h.breaker.trip_from_peer(wall(h) + 10_000.0, wall(h))
    assert h.events[-1].open_for == pytest.approx(BASE.open_for_max)
    h.clock.advance(BASE.open_for_max)
    assert h.breaker.state is S.HALF_OPEN


def test_the_peer_hold_is_forgotten_once_closed() -> None:
    h = Harness()
    h.breaker.trip_from_peer(wall(h) + 5.0, wall(h))
    h.clock.advance(5.0)
    assert h.call(OK) and h.call(OK)
    assert h.breaker.state is S.CLOSED
    h.trip()  # a later local trip holds the local open_for, not the old peer time
    assert h.events[-1].reason == "consecutive-failures"
    assert h.events[-1].open_for == pytest.approx(BASE.open_for)
    h.clock.advance(59.0)
    assert h.breaker.state is S.OPEN


def test_hold_until_wall_reports_what_a_shared_trip_publishes() -> None:
    h = Harness()
    assert h.breaker.hold_until_wall(wall(h)) is None
    h.trip()
    assert h.breaker.hold_until_wall(wall(h)) == pytest.approx(wall(h) + 60.0)
    h.clock.advance(10.0)
    assert h.breaker.hold_until_wall(wall(h)) == pytest.approx(wall(h) + 50.0)
    assert isinstance(h.events[-1], BreakerTransitioned)

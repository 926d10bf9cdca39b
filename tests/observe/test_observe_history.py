"""The status page's 15 minutes per route: bounded, slot by slot, on a fake clock."""

from __future__ import annotations

import pytest

from proxy.clock import FakeClock
from proxy.observe.history import SLOT_SECONDS, SLOTS, RouteHistory, quantile


def test_quantiles_interpolate_within_the_bucket() -> None:
    counts = [0] * 20
    counts[4] = 100  # all in (0.01, 0.025]
    assert quantile(counts, 0.5) == pytest.approx(0.0175)
    assert quantile(counts, 0.99) == pytest.approx(0.02485)
    assert quantile([0] * 20, 0.5) is None
    counts = [0] * 20
    counts[-1] = 3  # beyond 900 s: the highest finite bound
    assert quantile(counts, 0.99) == 900.0


def test_requests_failures_and_latency_land_in_their_slot() -> None:
    clock = FakeClock(start=10_000.0)
    h = RouteHistory()
    h.add(clock.now(), "ok", 0.004)
    h.add(clock.now(), "timeout", 2.0)
    clock.advance(SLOT_SECONDS)
    h.add(clock.now(), "ok", 0.004)
    h.add(clock.now(), "client-cancelled", 0.1)  # the client's doing: not a failure
    snap = h.snapshot(clock.now(), clock.wall(), None)
    assert len(snap["requests"]) == SLOTS
    assert snap["requests"][-2:] == [2, 2] and sum(snap["requests"]) == 4
    assert snap["failures"] == {"timeout": [0] * (SLOTS - 2) + [1, 0]}
    assert snap["p50_ms"][-3] is None and snap["p50_ms"][-1] is not None
    assert snap["p99_ms"][-2] == pytest.approx(2490.0, rel=0.01)  # in (1 s, 2.5 s]
    assert snap["breaker"] is None
    assert snap["latency_ms"]["p99"] is not None


def test_memory_is_bounded_and_old_slots_read_empty() -> None:
    clock = FakeClock(start=10_000.0)
    h = RouteHistory()
    for _ in range(5):
        h.add(clock.now(), "reset", 0.01)
    clock.advance(SLOTS * SLOT_SECONDS)  # one full lap later: the same ring index
    h.add(clock.now(), "ok", 0.01)
    snap = h.snapshot(clock.now(), clock.wall(), None)
    assert sum(snap["requests"]) == 1 and snap["failures"] == {}
    assert len(h._requests) == SLOTS  # the ring never grows


def test_the_breaker_timeline_shows_the_worst_state_of_each_slot() -> None:
    clock = FakeClock(start=10_000.0)
    h = RouteHistory()
    assert h.snapshot(clock.now(), clock.wall(), "closed")["breaker"] == ["closed"] * SLOTS
    clock.advance(100 * SLOT_SECONDS)
    h.note_breaker(clock.now(), "closed", "open")
    clock.advance(3 * SLOT_SECONDS)
    h.note_breaker(clock.now(), "open", "half_open")
    clock.advance(1.0)
    h.note_breaker(clock.now(), "half_open", "open")  # the trial failed: open, same slot
    clock.advance(2 * SLOT_SECONDS)
    h.note_breaker(clock.now(), "open", "half_open")  # a trial runs through a whole slot
    clock.advance(SLOT_SECONDS)
    h.note_breaker(clock.now(), "half_open", "closed")
    clock.advance(SLOT_SECONDS)
    timeline = h.snapshot(clock.now(), clock.wall(), "closed")["breaker"]
    # open from slot 0 of the outage (the worst state in force during each slot wins)
    assert timeline[-8:] == ["open"] * 6 + ["half_open", "closed"]
    assert timeline[:-8] == ["closed"] * (SLOTS - 8)
    # Long after the last transition, the state carried forward is the last one's.
    clock.advance(SLOTS * SLOT_SECONDS * 2)
    assert h.snapshot(clock.now(), clock.wall(), "closed")["breaker"] == ["closed"] * SLOTS


def test_a_lazily_noticed_half_open_stays_open_on_the_timeline() -> None:
    """Through Metrics: an open → half_open transition (made by a scrape when the hold ran
    out) is drawn as open, as breaker_state reports it until a trial is granted."""
    from proxy.observe.events import BreakerTransitioned
    from proxy.observe.metrics import Metrics

    clock = FakeClock(start=10_000.0)
    metrics = Metrics(clock=clock)
    metrics.route("r", "u")
    metrics.on_event(BreakerTransitioned("r", "u", "closed", "open", "consecutive-failures"))
    clock.advance(6 * SLOT_SECONDS)
    metrics.on_event(BreakerTransitioned("r", "u", "open", "half_open", "open-expired"))
    clock.advance(3 * SLOT_SECONDS)
    timeline = metrics.history["r"].snapshot(clock.now(), clock.wall(), "open")["breaker"]
    assert timeline[-10:] == ["open"] * 10 and "half_open" not in timeline


def test_the_history_buckets_are_the_metric_buckets() -> None:
    """The metrics hand the history the bucket they found for a duration (`add_in`)."""
    from proxy.observe.history import BOUNDS
    from proxy.observe.metrics import DURATION_BUCKETS

    assert BOUNDS == DURATION_BUCKETS

"""Local token buckets, quota snapshots, the Redis guard and the local backend, on a FakeClock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.clock import FakeClock
from proxy.config.model import StateSettings
from proxy.state import LocalBackend, RedisBackend, make_backend
from proxy.state.bucket import LocalBuckets, QuotaBoard, refill
from proxy.state.guard import FAILURES, PROBE_EVERY, Guard


def test_a_new_bucket_is_full_then_refills_at_rps() -> None:
    clock = FakeClock()
    buckets = LocalBuckets()
    admitted = [buckets.take("k", clock.now(), rps=2.0, burst=3.0)[0] for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    allowed, retry_after = buckets.take("k", clock.now(), 2.0, 3.0)
    assert not allowed and retry_after == pytest.approx(0.5)  # one token at 2/s
    clock.advance(0.49)
    assert buckets.take("k", clock.now(), 2.0, 3.0) == (False, pytest.approx(0.01))
    clock.advance(0.01)
    assert buckets.take("k", clock.now(), 2.0, 3.0) == (True, 0.0)
    clock.advance(100.0)  # refills only up to burst
    assert sum(buckets.take("k", clock.now(), 2.0, 3.0)[0] for _ in range(10)) == 3


def test_cost_takes_several_tokens_and_keys_are_independent() -> None:
    clock = FakeClock()
    buckets = LocalBuckets()
    assert buckets.take("a", clock.now(), 1.0, 5.0, cost=4) == (True, 0.0)
    assert buckets.take("a", clock.now(), 1.0, 5.0, cost=4) == (False, pytest.approx(3.0))
    assert buckets.take("b", clock.now(), 1.0, 5.0, cost=4) == (True, 0.0)


def test_buckets_are_bounded_by_least_recent_use() -> None:
    clock = FakeClock()
    buckets = LocalBuckets(max_keys=3)
    for key in "abcd":
        buckets.take(key, clock.now(), 1.0, 1.0)
    assert len(buckets) == 3
    # "a" was evicted: it comes back full; "d" is still empty
    assert buckets.take("a", clock.now(), 1.0, 1.0)[0] is True
    assert buckets.take("d", clock.now(), 1.0, 1.0)[0] is False


def test_time_running_backwards_adds_nothing() -> None:
    assert refill(1.0, -5.0, 10.0, 20.0) == 1.0
    assert refill(1.0, 0.5, 10.0, 20.0) == 6.0
    assert refill(1.0, 50.0, 10.0, 20.0) == 20.0


@settings(max_examples=60, deadline=None)
@given(
    rps=st.floats(0.5, 50.0),
    burst=st.floats(1.0, 40.0),
    gaps=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rps_times_t(
    rps: float, burst: float, gaps: list[float]
) -> None:
    clock = FakeClock()
    buckets = LocalBuckets()
    start = clock.now()
    admitted = 0
    for gap in gaps:
        clock.advance(gap)
        admitted += buckets.take("k", clock.now(), rps, burst)[0]
    assert admitted <= burst + rps * (clock.now() - start) + 1e-9


def test_quota_snapshots_expire_and_are_bounded() -> None:
    clock = FakeClock()
    board = QuotaBoard(max_keys=2)
    board.put(
        "gh", {"remaining": 0, "reset": 1_700_000_060.0, "resource": "core"}, 60.0, clock.now()
    )
    assert board.get("gh", clock.now()) == {
        "remaining": 0,
        "reset": 1_700_000_060.0,
        "resource": "core",
    }
    clock.advance(59.9)
    assert board.get("gh", clock.now()) is not None
    clock.advance(0.1)
    assert board.get("gh", clock.now()) is None
    for key in ("a", "b", "c"):
        board.put(key, {"remaining": 1}, 10.0, clock.now())
    assert len(board) == 2 and board.get("a", clock.now()) is None
    board.put("b", {"remaining": 1}, 0.0, clock.now())  # ttl ≤ 0 deletes
    assert board.get("b", clock.now()) is None


def test_guard_goes_down_after_three_errors_and_probes_every_five_seconds() -> None:
    clock = FakeClock()
    guard = Guard(clock)
    assert guard.up and guard.probe_due_in() is None
    assert [guard.failed() for _ in range(FAILURES)] == [False] * (FAILURES - 1) + [True]
    assert not guard.up
    assert guard.failed() is False  # already down: no second "went down"
    assert guard.probe_due_in() == PROBE_EVERY
    clock.advance(3.0)
    assert guard.probe_due_in() == pytest.approx(2.0)
    clock.advance(2.0)
    assert guard.probe_due_in() == 0.0
    guard.probe_failed()
    assert guard.probe_due_in() == PROBE_EVERY
    guard.succeeded()  # a late answer to a call sent before the outage: still down
    assert not guard.up
    assert guard.probe_succeeded() is True and guard.up
    assert guard.probe_succeeded() is False


def test_a_success_between_errors_resets_the_count() -> None:
    guard = Guard(FakeClock())
    for _ in range(10):
        guard.failed()
        guard.failed()
        guard.succeeded()
    assert guard.up


async def test_local_backend_is_a_process_local_bucket() -> None:
    clock = FakeClock()
    events: list[object] = []
    backend = make_backend(StateSettings(), clock, events.append)
    assert isinstance(backend, LocalBackend)
    await backend.start()
    assert events == []  # nothing to reach: no state_backend_* series for local
    assert backend.available and backend.live_peers() == 1
    assert [(await backend.take("r", 1.0, 2.0))[0] for _ in range(3)] == [True, True, False]
    await backend.put_quota("q", {"remaining": 3}, 5.0)
    assert await backend.get_quota("q") == {"remaining": 3}
    clock.advance(5.0)
    assert await backend.get_quota("q") is None
    await backend.publish_trip("r", "u", clock.wall() + 10)  # nothing to tell, no error
    await backend.close()


def test_make_backend_picks_redis() -> None:
    settings_ = StateSettings(backend="redis", url="redis://127.0.0.1:1/0")
    assert isinstance(make_backend(settings_, FakeClock()), RedisBackend)


def test_state_metrics_appear_with_a_redis_backend_and_move_with_its_events() -> None:
    from prometheus_client import generate_latest

    from proxy.observe.events import StateBackendChanged, StateBackendErrored
    from proxy.observe.metrics import Metrics

    metrics = Metrics(clock=FakeClock())
    assert b"state_backend" not in generate_latest(metrics.registry)  # local: no family

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value("resilience_proxy_" + name, labels)

    metrics.on_event(StateBackendChanged("redis", up=True))
    assert sample("state_backend_up", backend="redis") == 1.0
    assert b"# HELP resilience_proxy_state_backend_errors_total" in generate_latest(metrics.registry)
    for _ in range(3):
        metrics.on_event(StateBackendErrored("redis", "take"))
    metrics.on_event(StateBackendChanged("redis", up=False))
    assert sample("state_backend_up", backend="redis") == 0.0
    assert sample("state_backend_errors_total", backend="redis", op="take") == 3.0
    metrics.state_backend_gone()  # swapped for the local backend
    assert sample("state_backend_up", backend="redis") is None

"""Redis outages: a throwaway redis-server of our own, killed, frozen (SIGSTOP) and brought
back mid-load. Nothing raises or hangs, at most the first few calls pay `state.timeout`,
the guard stops asking, limits fall back to rps ÷ N, and shared limits resume after."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from proxy.clock import SYSTEM_CLOCK
from proxy.observe.events import StateBackendChanged, StateBackendErrored
from proxy.observe.metrics import Metrics
from proxy.state import RedisBackend
from proxy.state.guard import FAILURES, PROBE_EVERY
from tests.support.proxy import poll
from tests.support.redis import ThrowawayRedis, settings, throwaway_redis, unique_prefix

# state.timeout for these tests: above the default 50ms so that a CPU-starved test machine
# does not time calls out before the outage begins; what is asserted scales with it.
TIMEOUT = 0.15


class Fleet:
    """Three backends on one throwaway server, events of the first fed to real metrics."""

    def __init__(self, server: ThrowawayRedis) -> None:
        self.server = server
        self.prefix = unique_prefix()
        self.metrics = Metrics()
        self.events: list[object] = []
        self.backends: list[RedisBackend] = []

    def _emit(self, event: object) -> None:
        self.events.append(event)
        self.metrics.on_event(event)  # type: ignore[arg-type]

    async def start(self) -> RedisBackend:
        for i in range(3):
            emit = self._emit if i == 0 else None
            backend = RedisBackend(
                settings(self.server.url, self.prefix, TIMEOUT),
                SYSTEM_CLOCK,
                emit,
                heartbeat_every=0.2,
            )
            await backend.start()
            self.backends.append(backend)
        a = self.backends[0]
        await poll(lambda: all(b.live_peers() == 3 for b in self.backends), timeout=15)
        assert a.available
        return a

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()

    def errors(self, op: str | None = None) -> int:
        return sum(
            1 for e in self.events if isinstance(e, StateBackendErrored) and op in (None, e.op)
        )

    def changes(self) -> list[bool]:
        return [e.up for e in self.events if isinstance(e, StateBackendChanged)]

    def up_gauge(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "resilience_proxy_state_backend_up", {"backend": "redis"}
        )

    def error_counter(self, op: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "resilience_proxy_state_backend_errors_total", {"backend": "redis", "op": op}
        )
        return value or 0.0


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    with throwaway_redis() as server:
        group = Fleet(server)
        try:
            yield group
        finally:
            await group.close()


async def timed_takes(
    backend: RedisBackend, n: int, rps: float, burst: float
) -> list[tuple[bool, float]]:
    """n sequential takes: (allowed, seconds the call took)."""
    out = []
    for _ in range(n):
        began = time.monotonic()
        allowed, _ = await backend.take("shared", rps, burst)
        out.append((allowed, time.monotonic() - began))
    return out


async def admitted_over(
    backend: RedisBackend, seconds: float, rps: float, burst: float
) -> tuple[int, float]:
    admitted = 0
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        admitted += (await backend.take("shared", rps, burst))[0]
        await asyncio.sleep(0.005)
    return admitted, time.monotonic() - began


async def test_a_killed_redis_falls_back_to_rps_over_n_and_resumes_after_a_restart(
    fleet: Fleet,
) -> None:
    a = await fleet.start()
    assert a.available and fleet.changes() == [True] and fleet.up_gauge() == 1.0
    rps, burst = 30.0, 6.0

    fleet.server.kill()
    calls = await timed_takes(a, 20, rps, burst)
    assert max(d for _, d in calls) < TIMEOUT + 0.2  # connection refused: fast, never hung
    assert fleet.errors("take") <= FAILURES  # then the guard stopped asking
    assert not a.available and fleet.changes() == [True, False]
    assert fleet.up_gauge() == 0.0
    assert fleet.error_counter("take") == fleet.errors("take") >= 1
    assert a.live_peers() == 3  # the last count seen is kept while down

    # Locally at rps ÷ 3 with burst ÷ 3 (fresh bucket): at most 2 + 10 × T.
    admitted, elapsed = await admitted_over(a, 1.0, rps, burst)
    assert admitted <= burst / 3 + rps / 3 * elapsed + 1
    assert admitted >= rps / 3 * elapsed * 0.6
    errors_while_down = fleet.errors("take")
    assert errors_while_down <= FAILURES

    fleet.server.start()  # same port, empty
    await poll(lambda: a.available, timeout=PROBE_EVERY + 5)
    assert fleet.changes() == [True, False, True] and fleet.up_gauge() == 1.0
    assert fleet.errors("take") == errors_while_down  # nothing was sent while down
    # Shared again: a fresh Redis bucket admits the whole burst at once.
    assert [(await a.take("after", rps, burst))[0] for _ in range(int(burst))] == [True] * int(
        burst
    )
    client = fleet.server.client()
    try:
        assert await client.exists(f"{fleet.prefix}:bucket:after") == 1
    finally:
        await client.aclose()


async def test_a_frozen_redis_costs_the_first_few_calls_one_timeout_each(fleet: Fleet) -> None:
    a = await fleet.start()
    rps, burst = 30.0, 6.0
    fleet.server.freeze()  # packets go unanswered
    calls = await timed_takes(a, 30, rps, burst)
    durations = [d for _, d in calls]
    slow = [d for d in durations if d >= TIMEOUT * 0.8]
    assert max(durations) < TIMEOUT + 0.15  # bounded by state.timeout, never hung
    assert 1 <= len(slow) <= FAILURES  # the first few paid one timeout each ...
    assert all(d < TIMEOUT * 0.8 for d in durations[FAILURES:])  # ... then no more
    assert not a.available and fleet.changes() == [True, False]
    assert fleet.up_gauge() == 0.0 and 1 <= fleet.error_counter("take") <= FAILURES
    errors = fleet.errors()

    # Concurrent load while frozen: nothing is sent, every call answers at once.
    began = time.monotonic()
    results = await asyncio.gather(*(a.take("shared", rps, burst) for _ in range(50)))
    assert time.monotonic() - began < 0.2
    assert fleet.errors() == errors
    assert sum(ok for ok, _ in results) <= burst / 3 + 1

    fleet.server.thaw()
    await poll(lambda: a.available, timeout=PROBE_EVERY + 5)
    assert fleet.changes() == [True, False, True]
    calls = await timed_takes(a, 5, rps, burst)
    assert all(d < TIMEOUT for _, d in calls)


async def test_in_flight_calls_when_it_freezes_each_pay_at_most_one_timeout(fleet: Fleet) -> None:
    a = await fleet.start()
    fleet.server.freeze()

    async def one() -> float:
        began = time.monotonic()
        await a.take("shared", 10.0, 10.0)
        return time.monotonic() - began

    durations = await asyncio.gather(*(one() for _ in range(20)))
    assert max(durations) < TIMEOUT + 0.15
    assert not a.available
    # Later calls are answered locally without asking Redis.
    later = await asyncio.gather(*(one() for _ in range(20)))
    assert max(later) < TIMEOUT * 0.8


async def test_a_redis_that_is_down_at_start_starts_unavailable_and_comes_up() -> None:
    server = ThrowawayRedis()  # not started: nothing listens on its port
    events: list[object] = []
    backend = RedisBackend(settings(server.url, unique_prefix()), SYSTEM_CLOCK, events.append)
    try:
        began = time.monotonic()
        await backend.start()
        assert time.monotonic() - began < TIMEOUT + 0.2
        assert not backend.available
        assert [e.up for e in events if isinstance(e, StateBackendChanged)] == [False]
        assert (await backend.take("k", 1.0, 1.0)) == (True, 0.0)  # local, never raises
        server.start()
        await poll(lambda: backend.available, timeout=PROBE_EVERY + 5)
    finally:
        await backend.close()
        server.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_outages_leak_no_connections(fleet: Fleet) -> None:
    a = await fleet.start()
    await timed_takes(a, 20, 100.0, 100.0)
    before = open_fds()
    for _ in range(2):
        fleet.server.kill()
        await timed_takes(a, 20, 100.0, 100.0)
        await asyncio.sleep(1.5)  # pub/sub reconnect attempts while it is down
        fleet.server.start()
        await poll(lambda: a.available, timeout=PROBE_EVERY + 5)
        await timed_takes(a, 20, 100.0, 100.0)
        await asyncio.sleep(1.5)  # resubscribed
    # the three backends hold a few connections each; nothing accumulates per outage
    print(f"fds before {before}, after {open_fds()}")
    assert open_fds() <= before + 6
    client = fleet.server.client()
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    print(f"redis clients {len(clients)}")
    assert len(clients) <= 3 * 4 + 1

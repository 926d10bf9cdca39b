"""The Redis backend against the machine's Redis (a key prefix of our own, deleted after)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis as redis_sync

from proxy.clock import SYSTEM_CLOCK
from proxy.observe.events import StateBackendChanged, StateBackendErrored
from proxy.state import RedisBackend
from tests.support.proxy import poll
from tests.support.redis import (
    SHARED_URL,
    delete_prefix,
    prefix_keys,
    settings,
    throwaway_redis,
    unique_prefix,
)

Factory = Callable[..., Awaitable[tuple[RedisBackend, list[object]]]]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix()
    yield value
    delete_prefix(SHARED_URL, value)


@pytest.fixture
async def make(prefix: str) -> AsyncIterator[Factory]:
    started: list[RedisBackend] = []

    # A generous timeout: these tests are about what is shared, on a machine whose CPU is
    # shared too; what a timeout does is test_state_outage.py's business.
    async def factory(
        url: str = SHARED_URL, timeout: float = 0.5, **kwargs: object
    ) -> tuple[RedisBackend, list[object]]:
        events: list[object] = []
        backend = RedisBackend(
            settings(url, prefix, timeout), SYSTEM_CLOCK, events.append, **kwargs
        )  # type: ignore[arg-type]
        started.append(backend)
        await backend.start()
        return backend, events

    yield factory
    for backend in started:
        await backend.close()


def errors(events: list[object]) -> list[str]:
    return [e.op for e in events if isinstance(e, StateBackendErrored)]


async def test_the_lua_bucket_admits_at_most_burst_plus_rps_times_t(make: Factory) -> None:
    backend, events = await make()
    assert backend.available
    assert events == [StateBackendChanged("redis", up=True, where=SHARED_URL, peers=1)]
    rps, burst = 20.0, 5.0
    admitted = 0
    began = time.monotonic()
    while time.monotonic() - began < 1.0:
        allowed, retry_after = await backend.take("bucket", rps, burst)
        admitted += allowed
        assert 0.0 <= retry_after <= 1 / rps + 1e-6
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - began
    assert admitted <= burst + rps * elapsed
    assert admitted >= burst + rps * elapsed * 0.8  # and it does admit at the rate
    assert errors(events) == []


async def test_retry_after_is_the_time_until_the_cost_is_there(make: Factory) -> None:
    backend, _ = await make()
    assert await backend.take("slow", 0.5, 2.0, cost=2) == (True, 0.0)
    allowed, retry_after = await backend.take("slow", 0.5, 2.0, cost=1)
    assert not allowed and 1.9 < retry_after <= 2.0  # one token at 0.5/s


async def test_every_key_expires(make: Factory, prefix: str) -> None:
    a, _ = await make()
    await a.take("caller-1", 10.0, 20.0)
    await a.put_quota("github:core", {"remaining": 0, "reset": time.time() + 30}, 30.0)
    await a.publish_trip("r", "u", time.time() + 15)
    keys = prefix_keys(SHARED_URL, prefix)
    assert set(keys) == {
        f"{prefix}:bucket:caller-1",
        f"{prefix}:quota:github:core",
        f"{prefix}:sidecars",
        f"{prefix}:breaker-trips",
    }
    assert 0 < keys[f"{prefix}:bucket:caller-1"] <= 3000  # full again after burst / rps = 2 s
    assert 0 < keys[f"{prefix}:quota:github:core"] <= 30_000
    assert 0 < keys[f"{prefix}:sidecars"] <= 6000
    assert 0 < keys[f"{prefix}:breaker-trips"] <= 16_000


async def test_quota_snapshots_are_seen_by_every_sidecar_until_their_ttl(make: Factory) -> None:
    a, _ = await make()
    b, _ = await make()
    snapshot = {"remaining": 0, "limit": 5000, "reset": 1_700_000_000.5, "resource": "core"}
    await a.put_quota("gh", snapshot, 0.3)
    assert await b.get_quota("gh") == snapshot
    assert await b.get_quota("other") is None
    await poll(lambda: _is_none(b.get_quota("gh")), timeout=3)


async def _is_none(value: Awaitable[object]) -> bool:
    return (await value) is None


async def test_heartbeats_count_the_live_sidecars(make: Factory) -> None:
    a, _ = await make(heartbeat_every=0.1)
    b, _ = await make(heartbeat_every=0.1)
    c, _ = await make(heartbeat_every=0.1)
    await poll(lambda: a.live_peers() == b.live_peers() == c.live_peers() == 3, timeout=3)
    await c.close()  # leaves the set at once
    await poll(lambda: a.live_peers() == b.live_peers() == 2, timeout=3)


async def test_a_published_trip_reaches_the_others_and_a_late_starter(make: Factory) -> None:
    a, _ = await make()
    b, _ = await make()
    heard_a: list[tuple[str, str, float]] = []
    heard_b: list[tuple[str, str, float]] = []
    a.on_trip(lambda *t: heard_a.append(t))
    b.on_trip(lambda *t: heard_b.append(t))
    await asyncio.sleep(0.2)  # both subscribed
    until = time.time() + 20.0
    await a.publish_trip("hf", "huggingface", until)
    await poll(lambda: heard_b, timeout=3)
    route, upstream, heard_until = heard_b[0]
    assert (route, upstream) == ("hf", "huggingface")
    assert heard_until == pytest.approx(until, abs=0.5)
    await asyncio.sleep(0.2)
    assert heard_a == []  # never our own trip: no loops
    late, _ = await make()
    heard_late: list[tuple[str, str, float]] = []
    late.on_trip(lambda *t: heard_late.append(t))
    await poll(lambda: heard_late, timeout=3)  # read from the trips set after subscribing
    assert heard_late[0][:2] == ("hf", "huggingface")
    assert heard_late[0][2] == pytest.approx(until, abs=0.5)


async def test_expired_trips_are_not_replayed(make: Factory) -> None:
    a, _ = await make()
    await a.publish_trip("hf", "huggingface", time.time() + 0.2)
    await asyncio.sleep(0.4)
    late, _ = await make()
    heard: list[object] = []
    late.on_trip(lambda *t: heard.append(t))
    await asyncio.sleep(0.5)
    assert heard == []


async def test_a_forgotten_script_is_sent_again_with_eval(make: Factory) -> None:
    with throwaway_redis() as server:
        backend, events = await make(url=server.url)
        assert (await backend.take("k", 1.0, 5.0))[0]
        client = redis_sync.Redis(port=server.port)
        client.script_flush()
        client.close()
        assert (await backend.take("k", 1.0, 5.0))[0]
        assert errors(events) == []
        assert backend.available


async def test_a_password_in_the_url_works_and_is_never_shown(make: Factory) -> None:
    with throwaway_redis() as server:
        client = redis_sync.Redis(port=server.port)
        client.config_set("requirepass", "s3cret-redis-pass")
        client.close()
        url = f"redis://:s3cret-redis-pass@127.0.0.1:{server.port}/0"
        backend, events = await make(url=url)
        assert backend.available and (await backend.take("k", 1.0, 1.0))[0]
        wrong, wrong_events = await make(url=url.replace("s3cret", "wrong"))
        assert not wrong.available
        for event in [*events, *wrong_events]:
            assert "s3cret" not in repr(event)

"""A fleet on the machine's Redis (a key prefix of our own, deleted after): three backends
sharing one token bucket, and three proxies sharing breaker trips (`breaker.share: true`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis as redis_sync

from proxy.clock import SYSTEM_CLOCK
from proxy.observe.events import StateBackendErrored
from proxy.state import RedisBackend
from tests.support.proxy import RunningProxy, poll, start_proxy
from tests.support.redis import SHARED_URL, delete_prefix, settings, unique_prefix
from tests.support.upstream import Reply, ScriptedUpstream


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = unique_prefix()
    yield value
    delete_prefix(SHARED_URL, value)


async def test_three_backends_share_one_bucket(prefix: str) -> None:
    # A generous timeout: this test is about the atomic shared bucket on a busy machine, not
    # about outages (a call that times out is answered locally, at rps ÷ N: see
    # test_state_outage.py).
    errors: list[object] = []
    backends = [
        RedisBackend(
            settings(SHARED_URL, prefix, timeout=0.5),
            SYSTEM_CLOCK,
            errors.append,
            heartbeat_every=0.2,
        )
        for _ in range(3)
    ]
    for backend in backends:
        await backend.start()
    try:
        await poll(lambda: all(b.live_peers() == 3 for b in backends), timeout=5)
        errors.clear()
        rps, burst, seconds = 10.0, 5.0, 3.0
        admitted = [0, 0, 0]
        refused_with_a_wait = 0
        began = time.monotonic()

        async def load(i: int) -> None:
            nonlocal refused_with_a_wait
            while time.monotonic() - began < seconds:
                allowed, retry_after = await backends[i].take("fleet-route", rps, burst)
                admitted[i] += allowed
                refused_with_a_wait += (not allowed) and retry_after > 0
                await asyncio.sleep(0.003)

        # Four concurrent callers per sidecar, twelve in all.
        await asyncio.gather(*(load(i % 3) for i in range(12)))
        elapsed = time.monotonic() - began
        limit = burst + rps * elapsed
        total = sum(admitted)
        failed = [e for e in errors if isinstance(e, StateBackendErrored)]
        print(
            f"fleet bucket: admitted {total} over {elapsed:.2f}s, limit {limit:.1f}, "
            f"per sidecar {admitted}, state errors {len(failed)}"
        )
        assert total <= limit * 1.1  # one limit for the fleet, not three
        assert total >= rps * elapsed * 0.8
        assert all(n > 0 for n in admitted)
        assert refused_with_a_wait > 0
        assert all(b.available for b in backends)
    finally:
        for backend in backends:
            await backend.close()


CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
state: {backend: redis, url: "{REDIS}", key_prefix: {PREFIX}, timeout: 250ms}  # generous: a busy test machine
state_file: false
upstreams:
  u: {url: "{URL}"}
routes:
  - name: shared
    match: {path_prefix: /s/}
    upstream: u
    breaker: {consecutive_failures: 2, failure_rate: false, open_for: {OPEN_FOR}, half_open_calls: 1, share: true}
  - name: own
    match: {path_prefix: /o/}
    upstream: u
    breaker: {consecutive_failures: 2, failure_rate: false, open_for: 30s}
  - name: observed
    match: {path_prefix: /b/}
    upstream: u
    breaker: {consecutive_failures: 2, failure_rate: false, open_for: 30s, share: true, mode: observe}
"""


async def breaker_state(http: aiohttp.ClientSession, proxy: RunningProxy, route: str) -> str:
    async with http.get(proxy.admin + "/status") as resp:
        doc = await resp.json()
    found = next(r for r in doc["routes"] if r["name"] == route)
    return str(found["breaker"]["state"])


@pytest.fixture
async def fleet_factory(tmp_path: Path, prefix: str) -> AsyncIterator:  # type: ignore[type-arg]
    started: list[RunningProxy] = []

    async def factory(upstream: ScriptedUpstream, open_for: str = "30s") -> RunningProxy:
        where = tmp_path / f"p{len(started)}"
        where.mkdir()
        running = await start_proxy(
            CONFIG, where, URL=upstream.url, REDIS=SHARED_URL, PREFIX=prefix, OPEN_FOR=open_for
        )
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.app.close()


async def test_one_trip_opens_all_three_and_a_late_starter(
    fleet_factory, upstream: ScriptedUpstream, http: aiohttp.ClientSession, prefix: str
) -> None:
    proxies = [await fleet_factory(upstream) for _ in range(3)]
    listener = redis_sync.Redis.from_url(SHARED_URL).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(f"{prefix}:breaker-trips")
    try:
        await asyncio.sleep(0.3)  # every proxy has subscribed
        upstream.default = Reply(status=500)
        for _ in range(2):
            async with http.get(proxies[0].url + "/s/x") as resp:
                assert resp.status == 500
            async with http.get(proxies[0].url + "/b/x") as resp:
                assert resp.status == 500
        assert await breaker_state(http, proxies[0], "shared") == "open"
        assert await breaker_state(http, proxies[0], "observed") == "open"  # records, never rejects

        async def all_open() -> bool:
            return all([await breaker_state(http, p, "shared") == "open" for p in proxies])

        await poll(all_open, timeout=5)
        seen = len(upstream.requests)
        for proxy in proxies[1:]:  # the peers reject without asking the upstream
            async with http.get(proxy.url + "/s/x") as resp:
                assert resp.status == 503
                assert resp.headers["X-Resilience-Reason"] == "breaker-open"
                assert 25 <= int(resp.headers["Retry-After"]) <= 30
        assert len(upstream.requests) == seen
        # The route without `share` is untouched everywhere, and an observe-only trip is
        # not published (it must not make enforcing peers reject).
        assert [await breaker_state(http, p, "own") for p in proxies] == ["closed"] * 3
        assert [await breaker_state(http, p, "observed") for p in proxies[1:]] == ["closed"] * 2

        late = await fleet_factory(upstream)  # learns the trip from the trips set
        await poll(lambda: _is_open(http, late), timeout=5)

        # Exactly one message: a trip heard from a peer is never re-published.
        await asyncio.sleep(0.3)
        messages = []
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # None also stands for a subscribe confirmation
            message = listener.get_message(timeout=0.05)
            if message is not None:
                messages.append(json.loads(message["data"]))
        assert [(m["route"], m["upstream"]) for m in messages] == [("shared", "u")]
        assert 25 < messages[0]["hold"] <= 30
    finally:
        listener.close()


async def _is_open(http: aiohttp.ClientSession, proxy: RunningProxy) -> bool:
    return await breaker_state(http, proxy, "shared") == "open"


async def test_each_sidecar_runs_its_own_half_open_trial(
    fleet_factory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    proxies = [await fleet_factory(upstream, open_for="1s") for _ in range(3)]
    await asyncio.sleep(0.3)
    upstream.default = Reply(status=500)
    for _ in range(2):
        async with http.get(proxies[0].url + "/s/x") as resp:
            assert resp.status == 500

    async def all_open() -> bool:
        return all([await breaker_state(http, p, "shared") == "open" for p in proxies])

    await poll(all_open, timeout=5)
    upstream.default = Reply(status=200, body=b"back")
    await asyncio.sleep(1.1)  # the shared hold is over
    for proxy in proxies:
        before = len(upstream.requests)
        async with http.get(proxy.url + "/s/x") as resp:
            assert resp.status == 200  # this sidecar's own trial
        assert len(upstream.requests) == before + 1
        assert await breaker_state(http, proxy, "shared") == "closed"

"""Circuit breakers and bulkheads end to end (issue 4)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import scrape, value
from tests.support.proxy import free_port, poll, render
from tests.support.upstream import Reply, ScriptedUpstream

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: admin-token-123}
shutdown: {quiet_period: 200ms, drain_timeout: 5s}
state_file: {STATE}
upstreams:
  u: {url: "{URL}"}
routes:
  - name: guarded
    match: {path_prefix: /g/}
    upstream: u
    timeout: {total: 5s, per_try: 2s}
    breaker:
      consecutive_failures: 3
      failure_rate: {threshold: 50%, window: 10s, min_calls: 100}
      open_for: 1s
      open_for_max: 4s
      half_open_calls: 1
  - name: narrow
    match: {path_prefix: /n/}
    upstream: u
    timeout: {total: 5s, per_try: 5s}
    bulkhead: {max_concurrent: 2, max_queued: 1, queue_timeout: 200ms}
    breaker: {consecutive_failures: 2, open_for: 60s}
"""
TOKEN = {"Authorization": "Bearer admin-token-123"}


@pytest.fixture
async def proxy(proxy_factory, upstream, tmp_path):
    return await proxy_factory(CONFIG, URL=upstream.url, STATE=tmp_path / "state.json")


async def _status(http, proxy, route):
    async with http.get(proxy.admin + "/status") as resp:
        doc = await resp.json()
    return next(r for r in doc["routes"] if r["name"] == route)


async def test_breaker_opens_rejects_fast_then_closes_after_a_trial(proxy, upstream, http):
    upstream.default = Reply(status=500)
    for _ in range(3):
        async with http.get(proxy.url + "/g/x") as resp:
            assert resp.status == 500
    seen = len(upstream.requests)
    rejected = 'resilience_proxy_breaker_rejected_total'
    before = value(await scrape(http, proxy.admin), rejected, route="guarded", upstream="u")
    started = time.monotonic()
    for _ in range(20):
        async with http.get(proxy.url + "/g/x") as resp:
            assert resp.status == 503
            assert resp.headers["X-Resilience-Reason"] == "breaker-open"
            assert 1 <= int(resp.headers["Retry-After"]) <= 2
            assert (await resp.json())["error"]["reason"] == "breaker-open"
    assert time.monotonic() - started < 0.5  # fast: no upstream I/O
    assert len(upstream.requests) == seen
    after = value(await scrape(http, proxy.admin), rejected, route="guarded", upstream="u")
    assert after - before == 20  # one per breaker-open answer
    assert (await _status(http, proxy, "guarded"))["breaker"]["state"] == "open"

    upstream.default = Reply(status=200, body=b"healthy again")

    async def closes():
        async with http.get(proxy.url + "/g/x") as resp:
            return resp.status == 200

    await poll(closes, timeout=3, interval=0.1)
    assert (await _status(http, proxy, "guarded"))["breaker"]["state"] == "closed"
    text = await (await http.get(proxy.admin + "/metrics")).text()
    assert (
        'resilience_proxy_breaker_transitions_total{from_state="closed",route="guarded",'
        'to_state="open",upstream="u"} 1.0' in text
    )
    assert 'resilience_proxy_breaker_rejected_total{route="guarded",upstream="u"}' in text
    assert 'resilience_proxy_breaker_state{route="guarded",state="closed",upstream="u"} 1.0' in text


async def test_admin_breaker_controls_need_the_token(proxy, upstream, http):
    async with http.post(proxy.admin + "/breakers/guarded/open") as resp:
        assert resp.status == 401
    async with http.post(
        proxy.admin + "/breakers/guarded/open", headers={"Authorization": "Bearer nope"}
    ) as resp:
        assert resp.status == 403
    async with http.post(proxy.admin + "/breakers/missing/open", headers=TOKEN) as resp:
        assert resp.status == 404
    async with http.post(proxy.admin + "/breakers/guarded/open", headers=TOKEN) as resp:
        assert resp.status == 200
    async with http.get(proxy.url + "/g/x") as resp:
        assert resp.status == 503
    assert upstream.requests == []
    async with http.post(proxy.admin + "/breakers/guarded/close", headers=TOKEN) as resp:
        assert resp.status == 200
    upstream.default = Reply(status=500)
    for _ in range(5):  # forced closed: failures never open it
        async with http.get(proxy.url + "/g/x") as resp:
            assert resp.status == 500
    assert (await _status(http, proxy, "guarded"))["breaker"]["state"] == "forced_closed"
    async with http.post(proxy.admin + "/breakers/guarded/reset", headers=TOKEN) as resp:
        assert resp.status == 200
    assert (await _status(http, proxy, "guarded"))["breaker"]["state"] == "closed"


async def test_bulkhead_rejects_a_burst_at_once_and_releases_every_slot(proxy, upstream, http):
    upstream.default = Reply(delay=0.5)
    started = time.monotonic()

    async def one():
        async with http.get(proxy.url + "/n/slow") as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Resilience-Reason"), time.monotonic() - started

    results = await asyncio.gather(*(one() for _ in range(8)))
    ok = [r for r in results if r[0] == 200]
    full = [r for r in results if r[0] == 503]
    assert len(ok) == 2 and len(full) == 6
    assert all(r[1] == "bulkhead-full" for r in full)
    assert all(r[2] < 0.45 for r in full)  # rejected at once or after the 200ms queue wait
    bulkhead = (await _status(http, proxy, "narrow"))["bulkhead"]
    assert bulkhead["in_flight"] == 0 and bulkhead["queued"] == 0
    # Rejections are not breaker failures (consecutive_failures: 2 would have opened it).
    assert (await _status(http, proxy, "narrow"))["breaker"]["state"] == "closed"
    text = await (await http.get(proxy.admin + "/metrics")).text()
    assert 'resilience_proxy_bulkhead_rejected_total{route="narrow",upstream="u"} 6.0' in text


async def test_cancelled_requests_never_leak_bulkhead_slots(proxy, upstream, http):
    upstream.default = Reply(action="hang")

    async def abandoned():
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /n/x HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.transport.abort()

    for batch in range(0, 1000, 100):
        await asyncio.gather(*(abandoned() for _ in range(100)))

    async def drained():
        b = (await _status(http, proxy, "narrow"))["bulkhead"]
        return b["in_flight"] == 0 and b["queued"] == 0

    await poll(drained, timeout=10, interval=0.1)
    upstream.default = Reply(body=b"fine")
    async with http.get(proxy.url + "/n/after") as resp:
        assert resp.status == 200
        assert await resp.read() == b"fine"


def _spawn(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def _wait_healthy(http: aiohttp.ClientSession, admin: str) -> None:
    async def up():
        try:
            async with http.get(admin + "/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await poll(up, timeout=15, interval=0.1)


async def test_sigkill_while_open_restarts_open_without_a_burst(tmp_path, http):
    upstream = await ScriptedUpstream().start()
    upstream.default = Reply(status=500)
    port, admin_port = free_port(), free_port()
    text = render(
        CONFIG, port, admin_port, URL=upstream.url, STATE=tmp_path / "state.json"
    ).replace("open_for: 1s", "open_for: 30s").replace("open_for_max: 4s", "open_for_max: 60s")
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    proc = _spawn(config)
    try:
        await _wait_healthy(http, f"http://127.0.0.1:{admin_port}")
        for _ in range(3):
            async with http.get(f"http://127.0.0.1:{port}/g/x") as resp:
                assert resp.status == 500
        state = tmp_path / "state.json"
        await poll(lambda: state.exists() and '"open"' in state.read_text(), timeout=3)
        assert oct(state.stat().st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=5)
        seen = len(upstream.requests)
        proc = _spawn(config)
        await _wait_healthy(http, f"http://127.0.0.1:{admin_port}")
        for _ in range(10):
            async with http.get(f"http://127.0.0.1:{port}/g/x") as resp:
                assert resp.status == 503
                assert resp.headers["X-Resilience-Reason"] == "breaker-open"
        assert len(upstream.requests) == seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.communicate()
        await upstream.close()


async def test_corrupt_state_file_is_a_warning_not_fatal(proxy_factory, upstream, tmp_path, http):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    p = await proxy_factory(CONFIG, URL=upstream.url, STATE=state)
    async with http.get(p.url + "/g/x") as resp:
        assert resp.status == 200
    state.write_text(json.dumps({"format": "something-else"}))
    await p.app.close()

"""The state backend inside the proxy: lifecycle, /readyz, /metrics, /status, logs, reloads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.state import LocalBackend, RedisBackend
from proxy.state.guard import PROBE_EVERY
from tests.support.proxy import RunningProxy, poll, render, start_proxy
from tests.support.redis import SHARED_URL, delete_prefix, throwaway_redis, unique_prefix
from tests.support.upstream import Reply, ScriptedUpstream

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
state: {STATE}
state_file: false
upstreams:
  u: {url: "{URL}"}
routes:
  - name: shared
    match: {path_prefix: /s/}
    upstream: u
    breaker: {consecutive_failures: 2, failure_rate: false, open_for: 30s, share: true}
"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[list[RunningProxy]]:
    started: list[RunningProxy] = []
    yield started
    for proxy in started:
        await proxy.app.close()


async def readyz(http: aiohttp.ClientSession, proxy: RunningProxy) -> dict:  # type: ignore[type-arg]
    async with http.get(proxy.admin + "/readyz") as resp:
        assert resp.status == 200  # never `fail` because of Redis
        doc: dict = await resp.json(content_type=None)  # type: ignore[type-arg]
        return doc


async def metric(http: aiohttp.ClientSession, proxy: RunningProxy, line_start: str) -> float | None:
    async with http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


UP = 'resilience_proxy_state_backend_up{backend="redis"}'


async def test_redis_down_warns_in_readyz_counts_errors_logs_once_and_fails_no_request(
    running: list[RunningProxy],
    tmp_path: Path,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resilience_proxy")
    with throwaway_redis() as server:
        state = (
            f'{{backend: redis, url: "{server.url}", key_prefix: {unique_prefix()}, timeout: 250ms}}'
        )
        proxy = await start_proxy(CONFIG, tmp_path, URL=upstream.url, STATE=state)
        running.append(proxy)
        assert isinstance(proxy.app.registry.state, RedisBackend)
        assert proxy.app.registry.state is proxy.app.state
        doc = await readyz(http, proxy)
        assert doc["status"] == "pass" and "state" not in doc["checks"]
        assert await metric(http, proxy, UP) == 1.0
        async with http.get(proxy.admin + "/status") as resp:
            status = (await resp.json())["state"]
        assert status["backend"] == "redis" and status["available"] is True and status["peers"] == 1

        server.kill()
        await poll(lambda: not proxy.app.state.available, timeout=10)
        doc = await readyz(http, proxy)
        assert doc["status"] == "warn"
        assert doc["checks"]["state"][0]["status"] == "warn"
        assert await metric(http, proxy, UP) == 0.0
        errors = 0.0
        for op in ("heartbeat", "subscribe", "take", "probe"):
            errors += (
                await metric(
                    http,
                    proxy,
                    f'resilience_proxy_state_backend_errors_total{{backend="redis",op="{op}"}}',
                )
                or 0.0
            )
        assert errors >= 3

        # Requests, and a shared trip that cannot be published, are unaffected.
        upstream.default = Reply(status=500)
        codes = []
        for _ in range(4):
            async with http.get(proxy.url + "/s/x") as resp:
                codes.append(resp.status)
        assert codes == [500, 500, 503, 503]
        upstream.default = Reply(status=200)

        server.start()
        await poll(lambda: proxy.app.state.available, timeout=PROBE_EVERY + 5)
        assert (await readyz(http, proxy))["status"] == "pass"
        assert await metric(http, proxy, UP) == 1.0

    down = [r for r in caplog.records if r.getMessage() == "state_backend_down"]
    back = [r for r in caplog.records if r.getMessage() == "state_backend_up"]
    assert len(down) == 1 and down[0].levelno == logging.WARNING
    assert len(back) == 2 and all(r.levelno == logging.INFO for r in back)  # at start, and back


async def test_a_reload_that_changes_state_swaps_the_backend(
    running: list[RunningProxy],
    tmp_path: Path,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
) -> None:
    prefix = unique_prefix()
    try:
        proxy = await start_proxy(CONFIG, tmp_path, URL=upstream.url, STATE="{backend: local}")
        running.append(proxy)
        first = proxy.app.state
        assert isinstance(first, LocalBackend)
        async with http.get(proxy.admin + "/metrics") as resp:
            assert "state_backend" not in await resp.text()  # local: no such family
        assert (await readyz(http, proxy))["status"] == "pass"
        shared = f'{{backend: redis, url: "{SHARED_URL}", key_prefix: {prefix}}}'
        proxy.config_path.write_text(
            render(CONFIG, proxy.port, proxy.admin_port, URL=upstream.url, STATE=shared)
        )
        assert (await proxy.app.reload("admin"))[0] == "ok"
        second = proxy.app.state
        assert isinstance(second, RedisBackend) and second.available
        assert proxy.app.registry.state is second
        assert await metric(http, proxy, UP) == 1.0
        assert (
            await metric(http, proxy, 'resilience_proxy_state_backend_up{backend="local"}') is None
        )
        async with http.get(proxy.admin + "/config") as resp:
            assert (await resp.json())["state"]["key_prefix"] == prefix

        # The same settings again: the same backend is kept.
        proxy.config_path.write_text(
            render(CONFIG, proxy.port, proxy.admin_port, URL=upstream.url, STATE=shared)
            + "\n# edit\n"
        )
        assert (await proxy.app.reload("admin"))[0] == "ok"
        assert proxy.app.state is second

        proxy.config_path.write_text(
            render(CONFIG, proxy.port, proxy.admin_port, URL=upstream.url, STATE="{backend: local}")
        )
        assert (await proxy.app.reload("admin"))[0] == "ok"
        assert isinstance(proxy.app.state, LocalBackend)
        assert not second.available  # closed
        assert await metric(http, proxy, UP) is None
        async with http.get(proxy.url + "/s/x") as resp:
            assert resp.status == 200
    finally:
        delete_prefix(SHARED_URL, prefix)

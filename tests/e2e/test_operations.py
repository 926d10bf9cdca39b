"""Operations with a real process and real signals (issue 7): reloads and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.proxy import free_port, poll, render
from tests.support.upstream import Reply, ScriptedUpstream

BASE = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: optoken}
shutdown: {quiet_period: 500ms, drain_timeout: 6s}
state_file: {STATE}
upstreams:
  one: {url: "{URL1}"}
  two: {url: "{URL2}"}
routes:
  - name: first
    match: {path_prefix: /one/}
    upstream: one
    timeout: {total: 10s, per_try: 10s}
    breaker: {consecutive_failures: 2, open_for: 60s}
    fallback: {stale_if_error: 1h}
"""
EXTRA_ROUTE = """  - {name: second, match: {path_prefix: /two/}, upstream: two}
"""
TOKEN = {"Authorization": "Bearer optoken"}


class Proc:
    def __init__(self, config: Path, port: int, admin_port: int) -> None:
        self.config = config
        self.port = port
        self.admin_port = admin_port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "always"},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[ScriptedUpstream, ScriptedUpstream]]:
    a, b = await ScriptedUpstream().start(), await ScriptedUpstream().start()
    a.default = Reply(body=b"from one", headers={"Cache-Control": "max-age=0"})
    b.default = Reply(body=b"from two")
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def running(tmp_path, upstreams, http) -> AsyncIterator[Proc]:
    port, admin_port = free_port(), free_port()
    a, b = upstreams
    text = render(BASE, port, admin_port, URL1=a.url, URL2=b.url, STATE=tmp_path / "state.json")
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    proc = Proc(config, port, admin_port)

    async def healthy():
        try:
            async with http.get(proc.admin + "/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await poll(healthy, timeout=15, interval=0.1)
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.finish()


async def metric(http, proc, needle: str) -> float:
    async with http.get(proc.admin + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_sighup_adds_a_route_and_in_flight_finishes_on_old_config(running, upstreams, http):
    a, b = upstreams
    a.push(Reply(delay=1.0, body=b"slow old"))
    slow = asyncio.create_task(http.get(running.url + "/one/slow"))
    await poll(lambda: len(a.requests) == 1)
    running.config.write_text(running.config.read_text() + EXTRA_ROUTE)
    running.signal(signal.SIGHUP)

    async def reloaded():  # the start counts once: the SIGHUP's reload makes it 2
        return await metric(http, running, 'resilience_proxy_config_reloads_total{result="ok"}') >= 2

    await poll(reloaded, timeout=5, interval=0.1)
    async with http.get(running.url + "/two/x") as resp:
        assert resp.status == 200 and await resp.read() == b"from two"
    resp = await slow
    assert resp.status == 200 and await resp.read() == b"slow old"
    resp.release()


async def test_invalid_file_keeps_old_config_counts_and_logs(running, upstreams, http):
    running.config.write_text(running.config.read_text().replace("consecutive_failures: 2", "consecutive_failures: 0"))
    async with http.post(running.admin + "/reload", headers=TOKEN) as resp:
        assert resp.status == 422
        doc = await resp.json()
    assert doc["result"] == "error"
    assert any("breaker.consecutive_failures" in p and "proxy.yaml:" in p for p in doc["problems"])
    async with http.get(running.url + "/one/x") as resp:
        assert resp.status == 200
    assert await metric(http, running, 'resilience_proxy_config_reloads_total{result="error"}') == 1
    running.signal(signal.SIGTERM)
    code, err = running.finish()
    assert code == 0
    assert "config_reload_failed" in err and "consecutive_failures" in err


async def test_unchanged_file_counts_unchanged(running, http):
    async with http.post(running.admin + "/reload", headers=TOKEN) as resp:
        assert (await resp.json())["result"] == "unchanged"
    assert await metric(http, running, 'resilience_proxy_config_reloads_total{result="unchanged"}') == 1


async def test_file_changed_on_disk_is_picked_up_without_a_signal(running, http):
    # Written the way a ConfigMap update lands: a new file swapped in by rename.
    new = running.config.with_suffix(".new")
    new.write_text(running.config.read_text() + EXTRA_ROUTE)
    os.replace(new, running.config)

    async def serves_two():
        async with http.get(running.url + "/two/x") as resp:
            return resp.status == 200

    await poll(serves_two, timeout=8, interval=0.2)


async def test_breaker_state_and_cache_survive_a_reload(running, upstreams, http):
    a, _ = upstreams
    async with http.get(running.url + "/one/cached") as resp:
        assert await resp.read() == b"from one"
    async with http.post(running.admin + "/breakers/first/open", headers=TOKEN) as resp:
        assert resp.status == 200
    running.config.write_text(running.config.read_text() + EXTRA_ROUTE)
    async with http.post(running.admin + "/reload", headers=TOKEN) as resp:
        assert (await resp.json())["result"] == "ok"
    async with http.get(running.admin + "/status") as resp:
        route = next(r for r in (await resp.json())["routes"] if r["name"] == "first")
    assert route["breaker"]["state"] == "forced_open"
    async with http.get(running.url + "/one/cached") as resp:  # breaker open → stale
        assert resp.status == 200
        assert resp.headers["X-Resilience-Fallback"] == "stale"
        assert await resp.read() == b"from one"


async def test_sigterm_drains_while_the_agent_finishes(running, upstreams, http):
    a, _ = upstreams
    a.push(Reply(delay=1.5, body=b"long"))
    slow = asyncio.create_task(http.get(running.url + "/one/long"))
    await poll(lambda: len(a.requests) == 1)
    started = time.monotonic()
    running.signal(signal.SIGTERM)

    async def not_ready():
        async with http.get(running.admin + "/readyz") as resp:
            return resp.status == 503 and (await resp.json(content_type=None))["status"] == "fail"

    await poll(not_ready, timeout=2, interval=0.05)
    # The agent keeps sending for a moment: every request is still served.
    for _ in range(5):
        async with http.get(running.url + "/one/more") as resp:
            assert resp.status == 200
        await asyncio.sleep(0.1)
    resp = await slow
    assert resp.status == 200 and await resp.read() == b"long"
    resp.release()
    code, err = await asyncio.to_thread(running.finish, 15)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 6 + 2
    for alarming in ("Traceback", "Unclosed", "ResourceWarning", "Task was destroyed", "never awaited"):
        assert alarming not in err, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line["event"] == "stopped" for line in lines)
    state = json.loads(Path(running.config.parent / "state.json").read_text())
    assert state["format"] == "resilience-proxy/breakers/v1"


async def test_second_signal_exits_at_once(running, upstreams, http):
    a, _ = upstreams
    a.push(Reply(action="hang"))
    slow = asyncio.create_task(http.get(running.url + "/one/hang"))
    await poll(lambda: len(a.requests) == 1)
    running.signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    running.signal(signal.SIGTERM)
    code, err = await asyncio.to_thread(running.finish, 10)
    assert time.monotonic() - started < 2
    assert "Traceback" not in err
    slow.cancel()
    try:
        await slow
    except (asyncio.CancelledError, aiohttp.ClientError):
        pass


async def test_sighup_with_a_nul_byte_file_is_counted_and_the_process_keeps_reloading(running, http):
    # Issue 12 items 2-3: today the reload task dies ("Task exception was never retrieved"),
    # nothing is counted, and later edits are never picked up by the watcher.
    good = running.config.read_text()
    running.config.write_text(good.replace("routes:", "routes:\0"))
    running.signal(signal.SIGHUP)

    async def rejected():
        return await metric(http, running, 'resilience_proxy_config_reloads_total{result="error"}') >= 1

    await poll(rejected, timeout=5, interval=0.1)
    async with http.get(running.url + "/one/x") as resp:
        assert resp.status == 200  # the old config keeps serving
    shadowed = "  - {name: hidden, match: {path_prefix: /one/deeper/}, upstream: two}\n"
    running.config.write_text(good + EXTRA_ROUTE + shadowed)  # picked up by the watcher

    async def serves_two():
        async with http.get(running.url + "/two/x") as resp:
            return resp.status == 200

    await poll(serves_two, timeout=8, interval=0.2)
    running.signal(signal.SIGTERM)
    code, err = running.finish()
    assert code == 0
    assert "Task exception was never retrieved" not in err and "Traceback" not in err
    assert "config_reload_failed" in err and "U+0000" in err
    assert "config_warning" in err and "routes[2]: warning: never matches: routes[0] (first)" in err

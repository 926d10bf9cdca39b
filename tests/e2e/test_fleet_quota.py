"""A fleet of three proxy processes sharing the machine's Redis (DESIGN §15): a shared rate
limit holds across all three, and a quota exhausted through one is honoured by the others
without a request. Each test uses a key prefix of its own and deletes it afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.proxy import free_port, poll, render
from tests.support.redis import SHARED_URL, delete_prefix, prefix_keys, unique_prefix
from tests.support.upstream import Reply, ScriptedUpstream

FLEET = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
state: {backend: redis, url: "{REDIS}", key_prefix: "{PREFIX}", timeout: 200ms}
state_file: false
shutdown: {quiet_period: 100ms, drain_timeout: 2s}
upstreams:
  u: {url: "{URL}"}
  metered: {url: "{URL}", headers: {Authorization: "Bearer fleet-token"}, quota: {headers: generic}}
routes:
  - name: limited
    match: {path_prefix: /limited/}
    upstream: u
    rate_limit: {rps: 10, burst: 10, shared: true}
  - name: metered
    match: {path_prefix: /metered/}
    upstream: metered
    timeout: {total: 10s, per_try: 5s}
"""

RPS, BURST, SECONDS = 10, 10, 4.0


class Sidecar:
    def __init__(self, tmp: Path, index: int, values: dict[str, object]) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.config = tmp / f"sidecar-{index}.yaml"
        self.config.write_text(render(FLEET, self.port, self.admin_port, **values))
        self.log = tmp / f"sidecar-{index}.log"  # a file, not a pipe nobody reads while it runs
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text(errors="replace")


@pytest.fixture
async def fleet(tmp_path, http) -> AsyncIterator[tuple[list[Sidecar], ScriptedUpstream, str]]:
    upstream = await ScriptedUpstream().start()
    prefix = unique_prefix()
    values = {"URL": upstream.url, "REDIS": SHARED_URL, "PREFIX": prefix}
    sidecars = [Sidecar(tmp_path, i, values) for i in range(3)]
    try:
        for sidecar in sidecars:

            async def ready(s: Sidecar = sidecar) -> bool:
                try:
                    async with http.get(s.admin + "/status") as resp:
                        body = await resp.json()
                        return resp.status == 200 and body.get("state", {}).get("peers", 0) >= 1
                except aiohttp.ClientError:
                    return False

            await poll(ready, timeout=20, interval=0.1)
        # every sidecar has seen the others' heartbeats
        async def three_peers() -> bool:
            for s in sidecars:
                async with http.get(s.admin + "/status") as resp:
                    if (await resp.json())["state"]["peers"] != 3:
                        return False
            return True

        await poll(three_peers, timeout=15, interval=0.2)
        yield sidecars, upstream, prefix
    finally:
        for sidecar in sidecars:
            sidecar.terminate()
        for sidecar in sidecars:
            sidecar.stop()
        await upstream.close()
        delete_prefix(SHARED_URL, prefix)


async def test_a_shared_rate_limit_holds_across_three_sidecars(fleet, http):
    sidecars, upstream, prefix = fleet
    stop_at = time.monotonic() + SECONDS
    answers: dict[int, int] = {}

    async def load(sidecar: Sidecar) -> None:
        while time.monotonic() < stop_at:
            async with http.get(sidecar.url + "/limited/x") as resp:
                await resp.read()
                answers[resp.status] = answers.get(resp.status, 0) + 1
                if resp.status == 429:
                    assert resp.headers["X-Resilience-Reason"] == "rate-limited"
                    assert int(resp.headers["Retry-After"]) >= 1

    started = time.monotonic()
    await asyncio.gather(*(load(s) for s in sidecars for _ in range(3)))
    elapsed = time.monotonic() - started
    seen = len(upstream.requests)
    limit = BURST + RPS * elapsed
    print(f"fleet: upstream saw {seen} requests in {elapsed:.2f}s; global limit {limit:.1f}; answers {answers}")
    assert seen <= limit * 1.1, (seen, limit)
    assert seen >= RPS * elapsed * 0.5  # the limit admits, it does not just refuse
    assert answers.get(429, 0) > 0 and set(answers) <= {200, 429}
    assert any(":rl:limited:" in key for key in prefix_keys(SHARED_URL, prefix))
    shared = 0.0
    for sidecar in sidecars:
        async with http.get(sidecar.admin + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith('resilience_proxy_rate_limited_total{route="limited",source="shared"}'):
                    shared += float(line.rsplit(" ", 1)[1])
    assert shared == answers[429]  # every refusal counted, as source shared


async def test_a_quota_exhausted_through_one_sidecar_is_honoured_by_the_others(fleet, http, tmp_path):
    sidecars, upstream, prefix = fleet
    reset = int(time.time()) + 30
    upstream.default = Reply(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
    async with http.get(sidecars[0].url + "/metered/a") as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 1

    def published() -> bool:
        return any(":quota:" in key for key in prefix_keys(SHARED_URL, prefix))

    await poll(published, timeout=5)
    for sidecar in sidecars[1:]:
        async with http.get(sidecar.url + "/metered/b", headers={"X-Resilience-Timeout-Ms": "500"}) as resp:
            assert resp.status == 429
            assert resp.headers["X-Resilience-Reason"] == "quota"
            assert 25 <= int(resp.headers["Retry-After"]) <= 31
    assert len(upstream.requests) == 1  # nothing was spent by the other two
    # a sidecar that starts during the exhaustion knows it without spending a request
    late = Sidecar(tmp_path, 9, {"URL": upstream.url, "REDIS": SHARED_URL, "PREFIX": prefix})
    try:
        async def up() -> bool:
            try:
                async with http.get(late.admin + "/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await poll(up, timeout=20, interval=0.1)
        async with http.get(late.url + "/metered/c", headers={"X-Resilience-Timeout-Ms": "500"}) as resp:
            assert resp.status == 429 and resp.headers["X-Resilience-Reason"] == "quota"
    finally:
        late.stop()
    assert len(upstream.requests) == 1
    snapshot_keys = [k for k in prefix_keys(SHARED_URL, prefix) if ":quota:" in k]
    assert all(0 < ttl <= 31_000 for k, ttl in prefix_keys(SHARED_URL, prefix).items() if k in snapshot_keys)

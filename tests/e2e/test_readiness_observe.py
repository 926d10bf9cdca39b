"""Readiness with a critical database, and a breaker in observe mode, end to end."""

from __future__ import annotations

from tests.support.proxy import poll
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  u: {url: "{URL}"}
routes:
  - name: watched
    match: {path_prefix: /w/}
    upstream: u
    breaker: {consecutive_failures: 2, open_for: 60s, mode: observe}
postgres:
  - name: agentdb
    dsn: postgresql://postgres@127.0.0.1:1/postgres
    probe: {interval: 1s, timeout: 1s}
    critical: {consecutive_failures: 1}
    readiness: {READINESS}
"""


async def test_critical_database_fails_readiness_only_when_configured(proxy_factory, upstream, http):
    strict = await proxy_factory(CONFIG, URL=upstream.url, READINESS="fail_on_critical")

    async def readiness(p):
        async with http.get(p.admin + "/readyz") as resp:
            return resp.status, (await resp.json(content_type=None))["status"]

    await poll(lambda: _critical(http, strict), timeout=5, interval=0.1)
    assert await readiness(strict) == (503, "fail")
    async with http.get(strict.admin + "/healthz") as resp:  # liveness never depends on it
        assert resp.status == 200
    async with http.get(strict.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'resilience_proxy_pg_status{status="critical",target="agentdb"} 1.0' in text
    assert 'resilience_proxy_pg_up{target="agentdb"} 0.0' in text
    assert 'resilience_proxy_pg_probe_failures_total{reason="connect",target="agentdb"}' in text
    await strict.app.close()

    lenient = await proxy_factory(CONFIG, URL=upstream.url, READINESS="ignore")
    await poll(lambda: _critical(http, lenient), timeout=5, interval=0.1)
    assert await readiness(lenient) == (200, "warn")


async def _critical(http, p) -> bool:
    async with http.get(p.admin + "/status") as resp:
        doc = await resp.json()
    return doc["postgres"][0]["status"] == "critical"


async def test_observe_mode_records_and_reports_but_never_rejects(proxy_factory, upstream, http):
    p = await proxy_factory(CONFIG, URL=upstream.url, READINESS="ignore")
    upstream.default = Reply(status=500)
    for _ in range(6):
        async with http.get(p.url + "/w/x") as resp:
            assert resp.status == 500  # still forwarded: observe never rejects
    assert len(upstream.requests) == 6
    async with http.get(p.admin + "/status") as resp:
        breaker = (await resp.json())["routes"][0]["breaker"]
    assert breaker["state"] == "open"  # what enforce mode would have done
    async with http.get(p.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'to_state="open"' in text

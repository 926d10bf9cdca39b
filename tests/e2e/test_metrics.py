"""/metrics end to end (DESIGN §9): every value checked moves when its event happens, in
the Prometheus text format and in OpenMetrics; plain counters rendered at scrape time keep
the names, labels and bucket boundaries of the public contract."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
import pytest

from proxy.observe.log import LOGGER_NAME
from proxy.observe.metrics import DURATION_BUCKETS
from tests.support.metrics import samples, scrape, value
from tests.support.proxy import poll
from tests.support.upstream import Reply

P = "resilience_proxy_"
TOKEN = {"Authorization": "Bearer metrics-admin-token"}

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: metrics-admin-token}
upstreams:
  u: {url: "{URL}"}
  keyed:
    url: "{URL}"
    headers: {Authorization: "Bearer ${METRICS_TEST_TOKEN:-}", X-Team: "agents"}
  open: {url: "{URL}", headers: {X-Team: "agents"}}
routes:
  - name: r
    match: {path_prefix: /r/}
    upstream: u
    retry: {max_attempts: 2, backoff: {initial: 1ms, max: 1ms}}
  - name: guarded
    match: {path_prefix: /g/}
    upstream: u
    breaker: {consecutive_failures: 2, open_for: 1s, half_open_calls: 2}
  - {name: keyed, match: {path_prefix: /k/}, upstream: keyed}
"""


@pytest.fixture
async def proxy(proxy_factory, upstream):  # type: ignore[no-untyped-def]
    return await proxy_factory(CONFIG, URL=upstream.url)


async def test_request_attempt_and_retry_counters_move_with_real_requests(proxy, upstream, http):  # type: ignore[no-untyped-def]
    before = await scrape(http, proxy.admin)
    upstream.push(Reply(status=503), Reply(status=200))  # one retried request
    for _ in range(3):
        async with http.get(proxy.url + "/r/x") as resp:
            assert resp.status == 200
    async with http.post(proxy.url + "/r/x", data=b"{}") as resp:  # POST: not retried
        assert resp.status == 200
    after = await scrape(http, proxy.admin)

    def moved(name: str, **labels: str) -> float:
        return value(after, P + name, **labels) - value(before, P + name, **labels)

    ok = {"route": "r", "code": "200", "outcome": "ok"}
    assert moved("requests_total", method="GET", **ok) == 3
    assert moved("requests_total", method="POST", **ok) == 1
    assert moved("request_duration_seconds_count", route="r") == 4
    assert moved("request_duration_seconds_sum", route="r") > 0
    attempts = {"route": "r", "upstream": "u"}
    assert moved("upstream_attempts_total", result="ok", **attempts) == 4
    assert moved("upstream_attempts_total", result="status", **attempts) == 1
    assert moved("upstream_attempt_duration_seconds_count", **attempts) == 5
    assert moved("retries_total", route="r", reason="503") == 1
    assert moved("retry_calls_total", route="r", kind="successful_with_retry") == 1
    assert moved("retry_calls_total", route="r", kind="successful_without_retry") == 3

    # Histogram buckets: the DESIGN §9 boundaries, cumulative, +Inf equal to the count.
    buckets = [(ls["le"], v) for n, ls, v in samples(after)
               if n == P + "request_duration_seconds_bucket" and ls["route"] == "r"]  # fmt: skip
    assert [float(le) for le, _ in buckets[:-1]] == list(DURATION_BUCKETS)
    assert buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == value(after, P + "request_duration_seconds_count", route="r")


async def test_openmetrics_has_the_same_values_and_no_created_series(proxy, upstream, http):  # type: ignore[no-untyped-def]
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 200
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with http.get(proxy.admin + "/metrics", headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await resp.text()
    assert text.rstrip().endswith("# EOF")
    assert "# TYPE resilience_proxy_requests counter" in text
    line = 'resilience_proxy_requests_total{code="200",method="GET",outcome="ok",route="r"} 1.0'
    assert line in text
    assert "_created" not in text
    assert 'resilience_proxy_request_duration_seconds_bucket{le="+Inf",route="r"} 1.0' in text


async def test_a_malformed_request_line_counts_as_rejected_with_an_empty_route(proxy, upstream, http):  # type: ignore[no-untyped-def]
    before = await scrape(http, proxy.admin)
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.read(4096)
        writer.close()
        assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"400"
    after = await scrape(http, proxy.admin)
    labels = {"route": "", "code": "400", "outcome": "rejected", "method": "OTHER"}
    assert value(after, P + "requests_total", **labels) - value(before, P + "requests_total", **labels) == 2
    assert upstream.requests == []


async def test_an_open_breaker_reports_open_without_traffic_until_a_trial_is_granted(proxy, upstream, http):  # type: ignore[no-untyped-def]
    upstream.default = Reply(status=500)
    tripped_at = time.time()
    for _ in range(2):
        async with http.get(proxy.url + "/g/x") as resp:
            assert resp.status == 500
    labels = {"route": "guarded", "upstream": "u"}
    text = await scrape(http, proxy.admin)
    assert value(text, P + "breaker_state", state="open", **labels) == 1
    opened = value(text, P + "breaker_opened_timestamp_seconds", **labels)
    assert tripped_at - 1 <= opened <= time.time()

    await asyncio.sleep(1.3)  # open_for (1s) is over, and nobody calls
    for _ in range(2):  # however often it is scraped, it stays open
        text = await scrape(http, proxy.admin)
        assert value(text, P + "breaker_state", state="open", **labels) == 1
        assert value(text, P + "breaker_state", state="half_open", **labels) == 0
        assert value(text, P + "breaker_opened_timestamp_seconds", **labels) == opened

    upstream.default = Reply(status=200)
    async with http.get(proxy.url + "/g/x") as resp:  # a trial permit granted: half open
        assert resp.status == 200
    text = await scrape(http, proxy.admin)
    assert value(text, P + "breaker_state", state="half_open", **labels) == 1
    assert value(text, P + "breaker_opened_timestamp_seconds", **labels) == opened
    async with http.get(proxy.url + "/g/x") as resp:  # the second of half_open_calls: 2
        assert resp.status == 200
    text = await scrape(http, proxy.admin)
    assert value(text, P + "breaker_state", state="closed", **labels) == 1
    assert value(text, P + "breaker_opened_timestamp_seconds", **labels) == 0


async def test_reload_gauges_follow_a_rejected_and_a_fixed_reload(proxy, upstream, http):  # type: ignore[no-untyped-def]
    text = await scrape(http, proxy.admin)
    assert value(text, P + "config_last_reload_success") == 1
    started = value(text, P + "config_last_reload_timestamp_seconds")
    assert abs(started - time.time()) < 30
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good.replace("version: 1", "version: 7"))
    async with http.post(proxy.admin + "/reload", headers=TOKEN) as resp:
        assert resp.status == 422
    text = await scrape(http, proxy.admin)
    assert value(text, P + "config_last_reload_success") == 0
    rejected_at = value(text, P + "config_last_reload_timestamp_seconds")
    assert rejected_at >= started
    assert value(text, P + "config_reloads_total", result="error") == 1
    proxy.config_path.write_text(good + "\n# fixed\n")
    async with http.post(proxy.admin + "/reload", headers=TOKEN) as resp:
        assert resp.status == 200
    text = await scrape(http, proxy.admin)
    assert value(text, P + "config_last_reload_success") == 1
    assert value(text, P + "config_last_reload_timestamp_seconds") >= rejected_at


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({"event": record.getMessage(), **(getattr(record, "fields", None) or {})})


async def test_missing_credentials_are_a_gauge_and_a_warning_naming_the_header(
    proxy_factory, upstream, http, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    captured, level = Captured(), logger.level
    logger.addHandler(captured)
    logger.setLevel(logging.INFO)
    try:
        p = await proxy_factory(CONFIG, URL=upstream.url)  # METRICS_TEST_TOKEN is not set
        text = await scrape(http, p.admin)
        assert value(text, P + "upstream_credentials_present", upstream="keyed") == 0
        assert value(text, P + "upstream_credentials_present", upstream="open") == 1
        assert value(text, P + "upstream_credentials_present", upstream="u") == 1
        (line,) = [x for x in captured.lines if x["event"] == "upstream_credentials_missing"]
        assert (line["upstream"], line["header"]) == ("keyed", "Authorization")

        monkeypatch.setenv("METRICS_TEST_TOKEN", "tok-metrics-secret-value")
        p.config_path.write_text(p.config_path.read_text() + "\n# token arrived\n")
        async with http.post(p.admin + "/reload", headers=TOKEN) as resp:
            assert resp.status == 200
        text = await scrape(http, p.admin)
        assert value(text, P + "upstream_credentials_present", upstream="keyed") == 1
        assert len([x for x in captured.lines if x["event"] == "upstream_credentials_missing"]) == 1

        monkeypatch.delenv("METRICS_TEST_TOKEN")
        p.config_path.write_text(p.config_path.read_text() + "\n# token gone\n")
        async with http.post(p.admin + "/reload", headers=TOKEN) as resp:
            assert resp.status == 200
        text = await scrape(http, p.admin)
        assert value(text, P + "upstream_credentials_present", upstream="keyed") == 0
        missing = [x for x in captured.lines if x["event"] == "upstream_credentials_missing"]
        assert len(missing) == 2  # at start and on the reload
        assert all("tok-metrics-secret-value" not in str(x) for x in captured.lines)
        assert "tok-metrics-secret-value" not in text
    finally:
        logger.removeHandler(captured)
        logger.setLevel(level)


PG_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams: {u: {url: "{URL}"}}
routes: [{name: r, match: {path_prefix: /r/}, upstream: u}]
postgres:
  - name: main
    dsn: postgresql://postgres@127.0.0.1:5432/postgres
    application_name: {APP}
    agent_pool_size: 4
    pool: {min_size: 1, max_size: 2}
    probe: {interval: 1s, timeout: 2s}
"""


async def test_the_agents_pool_and_the_probers_own_pool_are_apart(proxy_factory, upstream, http):  # type: ignore[no-untyped-def]
    app_name = f"observe_agent_{int(time.time() * 1000) % 10**9}"
    dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
    idle = await asyncpg.connect(dsn, server_settings={"application_name": app_name})
    busy = await asyncpg.connect(dsn, server_settings={"application_name": app_name})
    tx = busy.transaction()
    await tx.start()
    await busy.execute("SELECT 1")  # busy is now idle in transaction
    try:
        p = await proxy_factory(PG_CONFIG, URL=upstream.url, APP=app_name)

        async def agent_seen() -> str | None:
            text = await scrape(http, p.admin)
            return text if value(text, P + "pg_agent_pool_size", target="main") == 2 else None

        text = await poll(agent_seen, timeout=10, interval=0.2)
        assert value(text, P + "pg_agent_pool_used", target="main") == 1
        assert value(text, P + "pg_agent_pool_idle", target="main") == 1
        ratio = value(text, P + "pg_server_utilization_ratio", target="main")
        assert ratio == pytest.approx(0.5)  # 2 connections of agent_pool_size 4
        assert value(text, P + "pg_server_utilization", target="main") == ratio  # deprecated twin
        assert value(text, P + "pg_pool_max_size", target="main") == 2  # the prober's own
        assert "The prober's own pool (not the agent's)" in text
    finally:
        await tx.rollback()
        await idle.close()
        await busy.close()

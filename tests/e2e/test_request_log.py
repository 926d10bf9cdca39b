"""Request IDs, trace context and the access log (DESIGN §13), through a real proxy."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from proxy.observe.log import JsonFormatter
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
{ACCESS}
upstreams:
  third: {url: "{URL}", headers: {Authorization: "Bearer access-log-secret-value"}}
  own: {url: "{URL}", request_id: true}
routes:
  - {name: third, match: {path_prefix: /third/}, upstream: third}
  - {name: own, match: {path_prefix: /own/}, upstream: own}
  - name: static
    match: {path_prefix: /static/}
    upstream: own
    fallback: {static: {status: 503, body: "down"}}
"""
HEX32 = re.compile(r"^[0-9a-f]{32}$")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, URL=upstream.url, ACCESS="")


async def test_a_generated_id_is_returned_and_sent_only_where_configured(proxy, upstream, http):
    async with http.get(proxy.url + "/third/a") as resp:
        third_id = resp.headers["X-Request-Id"]
    assert HEX32.match(third_id)
    assert upstream.requests[-1].header("X-Request-Id") is None  # third party: not sent
    async with http.get(proxy.url + "/own/a") as resp:
        own_id = resp.headers["X-Request-Id"]
    assert HEX32.match(own_id) and own_id != third_id
    assert upstream.requests[-1].header("X-Request-Id") == own_id


async def test_the_clients_id_is_kept_and_forwarded_like_any_header(proxy, upstream, http):
    headers = {"X-Request-Id": "agent-42:step/7", "traceparent": TRACEPARENT, "tracestate": "k=v"}
    async with http.get(proxy.url + "/third/a", headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == "agent-42:step/7"
    seen = upstream.requests[-1]
    assert seen.header("X-Request-Id") == "agent-42:step/7"
    assert seen.header("traceparent") == TRACEPARENT
    assert seen.header("tracestate") == "k=v"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "caf\u00e9", ""])
async def test_an_unusable_client_id_is_replaced(proxy, upstream, bad):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"GET /own/a HTTP/1.1\r\nHost: x\r\nX-Request-Id: "
        + bad.encode("latin-1")
        + b"\r\nConnection: close\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    match = re.search(rb"\r\nX-Request-Id: ([^\r]*)\r\n", raw)
    assert match and HEX32.match(match.group(1).decode())
    assert upstream.requests[-1].header("X-Request-Id") == match.group(1).decode()


async def test_every_answer_carries_an_id(proxy, upstream, http):
    async with http.get(proxy.url + "/nowhere") as resp:
        assert resp.status == 404 and HEX32.match(resp.headers["X-Request-Id"])
    upstream.push(Reply(status=503, body=b"no"))
    async with http.get(proxy.url + "/static/x", headers={"X-Request-Id": "mine"}) as resp:
        assert resp.headers["X-Resilience-Fallback"] == "static"
        assert resp.headers["X-Request-Id"] == "mine"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records if r.getMessage() == "access"]  # type: ignore[attr-defined]


async def test_access_log_line_has_the_fields_and_no_query_or_secret(
    proxy_factory, upstream, http, caplog
):
    caplog.set_level(logging.INFO, logger="resilience_proxy")
    p = await proxy_factory(CONFIG, URL=upstream.url, ACCESS="access_log: {enabled: true}")
    headers = {"traceparent": TRACEPARENT, "X-Request-Id": "req-1"}
    async with http.post(
        p.url + "/third/v1/models?api_key=query-secret-value", data=b"12345", headers=headers
    ) as resp:
        assert resp.status == 200
        await resp.read()
    [line] = access_lines(caplog)
    assert line["route"] == "third" and line["upstream"] == "third"
    assert line["method"] == "POST" and line["path"] == "/third/v1/models"
    assert line["status"] == 200 and line["outcome"] == "ok"
    assert line["attempts"] == 1 and line["retry_reasons"] == []
    assert line["fallback"] is None and line["breaker"] is None
    assert line["request_id"] == "req-1"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["bytes_in"] == 5 and line["bytes_out"] > 2
    assert line["duration_ms"] >= line["upstream_ms"] > 0
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "query-secret-value" not in text and "api_key" not in text
    assert "access-log-secret-value" not in text


async def test_access_log_sampling_slow_threshold_and_errors(proxy_factory, upstream, http, caplog):
    caplog.set_level(logging.INFO, logger="resilience_proxy")
    p = await proxy_factory(
        CONFIG, URL=upstream.url, ACCESS="access_log: {enabled: true, sample: 0, slow: 200ms}"
    )
    for _ in range(5):
        async with http.get(p.url + "/third/fast") as resp:
            await resp.read()
    assert access_lines(caplog) == []  # fast, and sampled out
    async with http.get(p.url + "/nowhere") as resp:
        assert resp.status == 404
    upstream.push(Reply(status=503, body=b"down"))
    async with http.get(p.url + "/static/x") as resp:
        assert resp.status == 503
    lines = access_lines(caplog)
    assert [(line["outcome"], line["status"]) for line in lines] == [
        ("no-route", 404),
        ("fallback-static", 503),
    ]
    assert lines[1]["fallback"] == "static"


async def test_access_log_slow_requests_are_logged(proxy_factory, upstream, http, caplog):
    caplog.set_level(logging.INFO, logger="resilience_proxy")
    p = await proxy_factory(CONFIG, URL=upstream.url, ACCESS="access_log: {enabled: true, slow: 200ms}")
    async with http.get(p.url + "/third/fast") as resp:
        await resp.read()
    upstream.push(Reply(delay=0.3, body=b"slow"))
    async with http.get(p.url + "/third/slow") as resp:
        await resp.read()
    assert [line["path"] for line in access_lines(caplog)] == ["/third/slow"]


async def test_access_log_off_by_default(proxy, upstream, http, caplog):
    caplog.set_level(logging.INFO, logger="resilience_proxy")
    async with http.get(proxy.url + "/nowhere") as resp:
        assert resp.status == 404
    assert access_lines(caplog) == []
    assert proxy.app.runtime.access is None

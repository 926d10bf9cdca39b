"""Failure causes in the log (DESIGN §13): an untrusted certificate, a refused connection,
a reset and a timeout each give one warning with route, upstream, outcome and cause; more
of the same within 10 s are counted into the next line. The last cause reaches /status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.observe.log import LOGGER_NAME
from tests.support.proxy import free_port, poll
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  tls: {url: "{TLS_URL}", connect_timeout: 2s}
  dead: {url: "http://127.0.0.1:{DEAD_PORT}"}
  flaky: {url: "{URL}"}
routes:
  - {name: secure, match: {path_prefix: /tls/}, upstream: tls}
  - {name: refused, match: {path_prefix: /dead/}, upstream: dead}
  - name: flaky
    match: {path_prefix: /flaky/}
    upstream: flaky
    timeout: {total: 5s, per_try: 300ms}
"""


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        self.lines.append({"event": record.getMessage(), "level": record.levelname, **fields})

    def failures(self, route: str) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if line["event"] == "upstream_attempt_failed" and line["route"] == route
        ]


@pytest.fixture
def logs() -> Iterator[Captured]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = Captured(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def proxy(proxy_factory, tls_upstream, upstream):  # type: ignore[no-untyped-def]
    # No ca_file: the upstream's certificate comes from a CA the proxy does not trust.
    return await proxy_factory(
        CONFIG, TLS_URL=tls_upstream.url, DEAD_PORT=free_port(), URL=upstream.url
    )


async def test_an_untrusted_certificate_is_named(proxy, http, logs, tls_upstream):  # type: ignore[no-untyped-def]
    async with http.get(proxy.url + "/tls/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "connect-failure"
    (line,) = logs.failures("secure")
    assert line["level"] == "WARNING"
    assert (line["upstream"], line["outcome"]) == ("tls", "connect-failure")
    assert line["cause"].startswith("CERTIFICATE_VERIFY_FAILED: ")
    assert "issuer" in line["cause"] or "self-signed" in line["cause"], line["cause"]
    assert tls_upstream.requests == []


async def test_a_refused_connection_is_named_and_repeats_are_suppressed(proxy, http, logs):  # type: ignore[no-untyped-def]
    proxy.app.registry.failures.window = 0.5  # the 10 s window, shortened for the test
    for _ in range(4):
        async with http.get(proxy.url + "/dead/x") as resp:
            assert resp.status == 502
    (line,) = logs.failures("refused")
    assert (line["upstream"], line["outcome"], line["cause"]) == (
        "dead", "connect-failure", "ECONNREFUSED",
    )  # fmt: skip
    assert line["suppressed"] == 0
    await asyncio.sleep(0.6)
    async with http.get(proxy.url + "/dead/x") as resp:
        assert resp.status == 502
    first, second = logs.failures("refused")
    assert second["cause"] == "ECONNREFUSED" and second["suppressed"] == 3

    async with http.get(proxy.admin + "/status") as resp:
        doc = await resp.json()
    route = next(r for r in doc["routes"] if r["name"] == "refused")
    assert route["last_failure"]["cause"] == "ECONNREFUSED"
    assert route["last_failure"]["outcome"] == "connect-failure"


async def test_a_reset_and_a_timeout_are_named(proxy, http, logs, upstream):  # type: ignore[no-untyped-def]
    upstream.push(Reply(action="reset-before-head"))
    async with http.get(proxy.url + "/flaky/x") as resp:
        assert resp.status == 502
    (reset,) = logs.failures("flaky")
    assert (reset["upstream"], reset["outcome"]) == ("flaky", "reset")
    # The connection closed before the head: an errno name or a few words, never a URL.
    assert reset["cause"] and "127.0.0.1" not in reset["cause"] and "/flaky" not in reset["cause"]

    upstream.push(Reply(action="hang"))
    async with http.get(proxy.url + "/flaky/slow") as resp:
        assert resp.status == 504
    await poll(lambda: len(logs.failures("flaky")) == 2)
    timeout = logs.failures("flaky")[1]
    assert (timeout["outcome"], timeout["cause"]) == ("timeout", "timeout after 0.30s")

    upstream.push(Reply(status=503))
    async with http.get(proxy.url + "/flaky/503") as resp:
        assert resp.status == 503
    status = logs.failures("flaky")[2]
    assert (status["outcome"], status["cause"]) == ("status", "status 503")

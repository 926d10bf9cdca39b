"""The admin listener (DESIGN §8): read-only endpoints, redaction, token rules."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: "{TOKEN}"}
upstreams:
  gh:
    url: "http://robot:hunter2pass@127.0.0.1:{UPORT}"
    headers: {Authorization: "Bearer ghp_injectedsecret"}
routes:
  - {name: gh, match: {path_prefix: /github/}, upstream: gh, breaker: {consecutive_failures: 5}}
postgres:
  - name: main
    dsn: postgresql://postgres:dbpassword99@127.0.0.1:1/postgres
    probe: {interval: 60, timeout: 1}
"""


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, UPORT=upstream.port, TOKEN="s3cret-admin-token")


SECRETS = ("hunter2pass", "ghp_injectedsecret", "dbpassword99", "s3cret-admin-token")


async def test_healthz_readyz_status_config(proxy, upstream, http):
    async with http.get(proxy.admin + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(proxy.admin + "/readyz") as resp:
        assert resp.headers["Content-Type"].startswith("application/health+json")
        doc = await resp.json(content_type=None)
        assert doc["status"] in ("pass", "warn", "fail")
    async with http.get(proxy.admin + "/status") as resp:
        doc = await resp.json()
    assert doc["config"]["hash"] == proxy.app.config.hash
    route = doc["routes"][0]
    assert route["name"] == "gh" and route["breaker"]["state"] == "closed"
    assert "retry" not in route["stages"] and "breaker" in route["stages"]
    async with http.get(proxy.admin + "/config") as resp:
        text = await resp.text()
    for secret in SECRETS:
        assert secret not in text, secret
    assert "<redacted>" in text
    json.loads(text)


async def test_secrets_never_in_metrics_status_or_error_bodies(proxy, upstream, http):
    upstream.push(Reply(status=500))
    async with http.get(proxy.url + "/github/x?token=querysecret") as resp:
        body = await resp.text()
    assert upstream.requests[-1].header("Authorization") == "Bearer ghp_injectedsecret"
    for path in ("/metrics", "/status", "/config", "/"):
        async with http.get(proxy.admin + path) as resp:
            text = await resp.text()
        for secret in (*SECRETS, "querysecret"):
            assert secret not in text, (path, secret)
    for secret in SECRETS:
        assert secret not in body


async def test_metrics_label_rules(proxy, upstream, http):
    async with http.request("PROPFIND", proxy.url + "/github/x") as resp:
        await resp.read()
    async with http.get(proxy.url + "/nowhere?q=secret") as resp:
        assert resp.status == 404
    async with http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    assert 'method="OTHER"' in text
    assert 'outcome="no-route"' in text
    assert "nowhere" not in text and "q=secret" not in text
    assert "resilience_proxy_config_info{hash=" in text
    async with http.get(
        proxy.admin + "/metrics", headers={"Accept": "application/openmetrics-text"}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).rstrip().endswith("# EOF")


async def test_mutations_need_the_token(proxy, http):
    for method, path in (
        ("POST", "/breakers/gh/open"),
        ("POST", "/reload"),
        ("DELETE", "/cache"),
    ):
        async with http.request(method, proxy.admin + path) as resp:
            assert resp.status == 401, path
        async with http.request(
            method, proxy.admin + path, headers={"Authorization": "Bearer wrong"}
        ) as resp:
            assert resp.status == 403, path
        async with http.request(
            method, proxy.admin + path, headers={"Authorization": "Bearer s3cret-admin-token"}
        ) as resp:
            assert resp.status == 200, path


async def test_no_token_configured_refuses_with_how_to(proxy_factory, upstream, http):
    p = await proxy_factory(CONFIG.replace(', token: "{TOKEN}"', ""), UPORT=upstream.port)
    async with http.post(p.admin + "/reload", headers={"Authorization": "Bearer x"}) as resp:
        assert resp.status == 403
        assert "admin.token" in (await resp.json())["error"]["message"]


async def test_status_page_is_served(proxy, http):
    async with http.get(proxy.admin + "/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        html = await resp.text()
    assert "resilience-proxy" in html
    # No external assets: nothing is loaded from another origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", html)
    assert "@import" not in html


async def test_non_loopback_admin_needs_the_token_except_probes_and_metrics(proxy_factory, upstream, http):
    text = CONFIG.replace("admin: {listen: 127.0.0.1:{ADMIN_PORT}", "admin: {listen: 0.0.0.0:{ADMIN_PORT}")
    p = await proxy_factory(text, UPORT=upstream.port, TOKEN="s3cret-admin-token")
    for path in ("/metrics", "/healthz", "/readyz"):
        async with http.get(p.admin + path) as resp:
            assert resp.status in (200, 503), path
    for path in ("/status", "/config", "/"):
        async with http.get(p.admin + path) as resp:
            assert resp.status == 401, path
        async with http.get(p.admin + path, headers={"Authorization": "Bearer s3cret-admin-token"}) as resp:
            assert resp.status == 200, path


async def test_one_log_line_per_retry_without_secrets(proxy_factory, upstream, http, caplog):
    import logging

    text = CONFIG.replace(
        "routes:\n",
        "routes:\n  - {name: retried, match: {path_prefix: /retry/}, upstream: gh,"
        " retry: {max_attempts: 2, backoff: {initial: 1ms, jitter: none}}}\n",
    )
    p = await proxy_factory(text, UPORT=upstream.port, TOKEN="s3cret-admin-token")
    upstream.push(Reply(status=503), Reply(status=200))
    with caplog.at_level(logging.INFO, logger="resilience_proxy"):
        async with http.get(p.url + "/retry/x?token=querysecret") as resp:
            assert resp.status == 200
    retries = [r for r in caplog.records if r.getMessage() == "retry"]
    assert len(retries) == 1
    fields = retries[0].fields  # type: ignore[attr-defined]
    assert fields["route"] == "retried" and fields["attempt"] == 2 and fields["reason"] == "503"
    assert 0 <= fields["wait"] <= 0.01
    from proxy.observe.log import JsonFormatter

    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in (*SECRETS, "querysecret"):
        assert secret not in formatted


async def test_a_token_with_non_utf8_bytes_is_refused_not_a_500(proxy):
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.admin_port)
    writer.write(
        b"POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 403"), raw[:100]

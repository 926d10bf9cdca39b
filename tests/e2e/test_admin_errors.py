"""Admin listener errors (issue 12 items 7 and 11) and per-check readiness (item 9)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.proxy import poll

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: admin-token-1234}
upstreams:
  u: {url: "{URL}"}
routes:
  - {name: r, match: {path_prefix: /r/}, upstream: u, breaker: {consecutive_failures: 5}}
"""
AUTH = {"Authorization": "Bearer admin-token-1234"}


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, URL=upstream.url)


async def test_unknown_breaker_action_is_not_found(proxy, http):
    async with http.post(proxy.admin + "/breakers/r/explode", headers=AUTH) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["reason"] == "not-found"
    assert body["error"]["route"] == "r"
    assert "open, close, disable, reset" in body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "allow"),
    [("/reload", "POST"), ("/breakers/r/open", "POST"), ("/cache", "DELETE")],
)
async def test_get_on_a_mutation_endpoint_is_405_with_a_json_body(proxy, http, path, allow):
    async with http.get(proxy.admin + path) as resp:
        assert resp.status == 405
        assert resp.headers["Content-Type"].startswith("application/json")
        assert allow in resp.headers["Allow"]
        body = await resp.json()
    assert body["error"]["reason"] == "method-not-allowed"
    assert set(body["error"]) == {"reason", "route", "message"}


async def test_unknown_admin_path_is_a_json_404(proxy, http):
    async with http.get(proxy.admin + "/nope") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body == {"error": {"reason": "not-found", "route": "", "message": "no such admin endpoint"}}


async def test_no_server_banner_on_any_admin_response(proxy, http):
    requests = [
        ("GET", "/healthz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/", {}),
        ("GET", "/nope", {}),
        ("GET", "/reload", {}),
        ("POST", "/reload", {}),
        ("POST", "/reload", AUTH),
    ]
    for method, path, headers in requests:
        async with http.request(method, proxy.admin + path, headers=headers) as resp:
            await resp.read()
            assert "Server" not in resp.headers, (method, path, resp.headers.get("Server"))


async def raw_admin(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("token", [b"\xff\xfe", b"admin-token-1234\xff", b"\xc3\xa9t\xc3\xa9"])
async def test_raw_bytes_in_the_bearer_token_are_403_never_500(proxy, token):
    raw = await raw_admin(
        proxy.admin_port,
        b"POST /reload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + token
        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"403", raw[:200]
    assert b'"reason":"unauthorized"' in rest


PG_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  u: {url: "{URL}"}
routes:
  - {name: r, match: {path_prefix: /r/}, upstream: u}
postgres:
  - name: ignored
    dsn: postgresql://postgres@127.0.0.1:1/postgres
    probe: {interval: 1s, timeout: 1s}
    critical: {consecutive_failures: 1}
    readiness: ignore
  - name: strict
    dsn: postgresql://postgres@127.0.0.1:1/postgres
    probe: {interval: 1s, timeout: 1s}
    critical: {consecutive_failures: 1}
    readiness: fail_on_critical
"""


async def test_readyz_gives_each_postgres_check_its_own_status(proxy_factory, upstream, http):
    p = await proxy_factory(PG_CONFIG, URL=upstream.url)

    async def both_critical() -> bool:
        async with http.get(p.admin + "/status") as resp:
            doc = await resp.json()
        return all(target["status"] == "critical" for target in doc["postgres"])

    await poll(both_critical, timeout=5, interval=0.1)
    async with http.get(p.admin + "/readyz") as resp:
        assert resp.status == 503
        doc = await resp.json(content_type=None)
    assert doc["status"] == "fail"
    by_target = {check["output"].split(":")[0]: check["status"] for check in doc["checks"]["postgres"]}
    assert by_target == {"postgres ignored": "warn", "postgres strict": "fail"}

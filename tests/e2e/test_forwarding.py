"""Forwarding as DESIGN §5 describes it, through a real proxy to real loopback upstreams."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
from pathlib import Path

import aiohttp
import pytest

from tests.support.upstream import Reply

BASIC = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  api:
    url: {URL}
    headers:
      Authorization: "Bearer injected-secret-value"
  fwd:
    url: {URL}/base/
    forwarded_headers: true
routes:
  - name: api
    match: {path_prefix: /api/}
    upstream: api
  - name: fwd
    match: {path_prefix: /fwd}
    upstream: fwd
  - name: hosted
    match: {path_prefix: /, host: Example.COM}
    upstream: fwd
    strip_prefix: false
  - name: posts-only
    match: {path_prefix: /only-post/, methods: [POST]}
    upstream: api
"""


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(read_timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


@pytest.fixture
async def basic(proxy_factory, upstream):
    return await proxy_factory(BASIC, URL=upstream.url)


async def test_path_and_query_are_forwarded_byte_for_byte(basic, upstream, http):
    async with http.get(basic.url + "/api/v1/models/a%2Fb?q=x%20y&z=1") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
        assert resp.headers["X-Resilience-Attempts"] == "1"
        assert resp.headers["Via"] == "1.1 resilience-proxy"
    seen = upstream.requests[-1]
    assert seen.target == "/v1/models/a%2Fb?q=x%20y&z=1"


async def test_base_path_joined_and_prefix_without_trailing_slash(basic, upstream, http):
    async with http.get(basic.url + "/fwd/x/y") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].target == "/base/x/y"
    async with http.get(basic.url + "/fwd") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].target == "/base/"
    async with http.get(basic.url + "/fwdx") as resp:  # segment-wise, never a string prefix
        assert resp.status == 404


async def test_host_and_method_matching_first_match_wins(basic, upstream, http):
    async with http.get(basic.url + "/anything", headers={"Host": "example.com:8080"}) as resp:
        assert resp.status == 200
    assert upstream.requests[-1].target == "/base/anything"
    async with http.get(basic.url + "/only-post/x") as resp:
        assert resp.status == 404
    async with http.post(basic.url + "/only-post/x", data=b"hi") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].body == b"hi"


async def test_headers_rewritten_as_designed(basic, upstream, http):
    upstream.push(
        Reply(
            headers=[
                ("Connection", "close, X-Upstream-Hop"),
                ("X-Upstream-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("X-Kept", "yes"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]
        )
    )
    headers = {
        "Connection": "X-Client-Hop",
        "X-Client-Hop": "secret",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Resilience-Timeout-Ms": "5000",
        "X-Forwarded-For": "10.0.0.1",
        "Authorization": "Bearer client-own",
        "X-Custom": "kept",
        "Cookie": "c=1",
    }
    async with http.get(basic.url + "/api/h", headers=headers) as resp:
        assert resp.status == 200
        assert "X-Upstream-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["X-Kept"] == "yes"
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "Server" not in resp.headers
        assert "Content-Type" not in resp.headers  # the upstream sent none; none is invented
    seen = upstream.requests[-1]
    names = seen.header_names()
    for hop in ("x-client-hop", "te", "proxy-authorization", "x-resilience-timeout-ms"):
        assert hop not in names
    assert "x-forwarded-for" not in names  # forwarded_headers is off for third parties
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"
    assert seen.header("Authorization") == "Bearer injected-secret-value"
    assert seen.header("X-Custom") == "kept"
    assert seen.header("Cookie") == "c=1"
    assert seen.header("Via") == "1.1 resilience-proxy"
    # Nothing else is added: no User-Agent, Accept or Accept-Encoding of the proxy's own.
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")) as bare:
        async with bare.get(basic.url + "/api/bare") as resp:
            assert resp.status == 200
    bare_names = upstream.requests[-1].header_names()
    assert not {"user-agent", "accept", "accept-encoding"} & bare_names


async def test_forwarded_headers_only_when_enabled(basic, upstream, http):
    async with http.get(basic.url + "/fwd/a", headers={"X-Forwarded-For": "10.1.1.1"}) as resp:
        assert resp.status == 200
    seen = upstream.requests[-1]
    assert seen.header("X-Forwarded-For") == "10.1.1.1, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{basic.port}"


async def test_redirects_pass_through_with_location_rewritten(basic, upstream, http):
    upstream.push(Reply(status=302, headers={"Location": f"{upstream.url}/next?page=2"}))
    async with http.get(basic.url + "/api/start", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/api/next?page=2"
    link = (f'<{upstream.url}/issues?page=2>; rel="next", '
            f'<{upstream.url}/issues?page=9>; rel="last", <https://other.example/x>; rel="help"')
    upstream.push(Reply(headers={"Link": link}))
    async with http.get(basic.url + "/api/issues") as resp:
        assert resp.headers["Link"] == (
            f'<{basic.url}/api/issues?page=2>; rel="next", '
            f'<{basic.url}/api/issues?page=9>; rel="last", <https://other.example/x>; rel="help"'
        )
    upstream.push(Reply(status=301, headers={"Location": "https://elsewhere.example/x"}))
    async with http.get(basic.url + "/api/start", allow_redirects=False) as resp:
        assert resp.headers["Location"] == "https://elsewhere.example/x"
    assert len(upstream.requests) == 3  # never followed


async def test_content_codings_pass_through_untouched(basic, upstream, http):
    import gzip

    body = gzip.compress(b"hello" * 100)
    upstream.push(Reply(headers={"Content-Encoding": "gzip"}, body=body))
    async with http.get(basic.url + "/api/z", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == body
    assert upstream.requests[-1].header("Accept-Encoding") == "gzip"


async def test_no_cookie_jar_between_requests(basic, upstream, http):
    upstream.push(Reply(headers={"Set-Cookie": "session=abc; Path=/"}))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(basic.url + "/api/login") as resp:
            assert resp.status == 200
        async with s.get(basic.url + "/api/again") as resp:
            assert resp.status == 200
    assert upstream.requests[-1].header("Cookie") is None


async def test_head_and_204_304_carry_no_body_and_keep_content_length(basic, upstream):
    upstream.push(Reply(status=200, headers={"Content-Length": "1234"}, body=b""))
    raw = await raw_request(
        basic.port, b"HEAD /api/h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"content-length: 1234" in head.lower()
    assert rest == b""
    upstream.push(Reply(status=304, headers={"ETag": '"x"'}, body=b""))
    raw = await raw_request(basic.port, b"GET /api/n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 304 " in head.split(b"\r\n")[0]
    assert rest == b""


async def test_http10_client_never_gets_chunked(basic, upstream):
    upstream.push(Reply(body=b"x" * 5000, chunked=True, chunks=5))
    raw = await raw_request(basic.port, b"GET /api/c HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"x" * 5000


async def test_expect_100_continue_is_answered_by_the_proxy(basic, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", basic.port)
    try:
        writer.write(
            b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"hello")
        await writer.drain()
        final = await asyncio.wait_for(reader.read(), 5)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    seen = upstream.requests[-1]
    assert seen.body == b"hello"
    assert seen.header("Expect") is None


async def test_h2c_upgrade_offer_is_ignored_and_served_over_http11(basic, upstream):
    raw = await raw_request(
        basic.port,
        b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    assert status_of(raw) == 200
    assert not {"upgrade", "http2-settings"} & upstream.requests[-1].header_names()


async def test_refusals_never_reach_the_upstream(basic, upstream):
    cases = [
        (b"GET /api/a/../b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /api/a/%2e%2E/b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /api/./b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /api/a%5cb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /api/a%00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400),
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /api/x HTTP/1.1\r\nHost: x\r\nVia: 1.1 resilience-proxy\r\n\r\n", 508),
        (b"GET /api/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
        (b"GARBAGE\r\n\r\n", 400),
    ]
    for request, status in cases:
        raw = await raw_request(basic.port, request, read_timeout=2)
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line.split(b" ")[1] == str(status).encode(), (request, raw[:200])
        if status != 400 or b"GARBAGE" not in request:
            assert b'"error"' in raw
    assert upstream.requests == []


async def test_limits_413_431_408(proxy_factory, upstream, tmp_path):
    text = BASIC.replace(
        "routes:",
        "limits: {max_request_body: 1KiB, max_header_bytes: 2KiB, "
        "client_header_timeout: 300ms, client_body_timeout: 300ms}\nroutes:",
    )
    p = await proxy_factory(text, URL=upstream.url)
    raw = await raw_request(
        p.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 100
    )
    assert status_of(raw) == 413
    raw = await raw_request(
        p.port,
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n",
    )
    assert status_of(raw) == 413
    big = b"X-Big: " + b"a" * 3000 + b"\r\n"
    raw = await raw_request(p.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert status_of(raw) == 431
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(40))
    raw = await raw_request(p.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status_of(raw) == 431
    # A head that never completes: 408 after client_header_timeout, connection closed.
    raw = await raw_request(p.port, b"GET /api/x HTTP/1.1\r\nHost: x\r\n", read_timeout=3)
    assert status_of(raw) == 408
    # A body that stalls: 408.
    raw = await raw_request(
        p.port, b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", read_timeout=3
    )
    assert status_of(raw) == 408
    assert upstream.requests == []


async def test_unreachable_upstream_is_502_connect_failure(proxy_factory, http):
    from tests.support.proxy import free_port

    p = await proxy_factory(BASIC, URL=f"http://127.0.0.1:{free_port()}")
    async with http.get(p.url + "/api/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "connect-failure"
        body = await resp.json()
        assert "Server" not in resp.headers  # the proxy does not advertise its software
        assert body["error"]["reason"] == "connect-failure"
        assert body["error"]["route"] == "api"
        assert "127.0.0.1" not in body["error"]["message"]


async def test_upstream_closing_mid_body_fails_the_client_response(basic, upstream, http):
    upstream.push(Reply(body=b"y" * 100_000, action="close-mid-body"))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(basic.url + "/api/cut") as resp:
            assert resp.status == 200
            await resp.read()
    upstream.push(Reply(body=b"y" * 100_000, chunked=True, action="close-mid-body"))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(basic.url + "/api/cut2") as resp:
            await resp.read()
    async with http.get(basic.url + "/api/after") as resp:  # the proxy is fine afterwards
        assert resp.status == 200


async def test_https_upstream_with_ca_file(proxy_factory, tls_upstream, ca_file, http, upstream):
    text = """
    version: 1
    listen: 127.0.0.1:{PORT}
    admin: {listen: 127.0.0.1:{ADMIN_PORT}}
    upstreams:
      secure: {url: "{URL}", tls: {ca_file: "{CA}"}}
      untrusted: {url: "{URL}"}
    routes:
      - {name: secure, match: {path_prefix: /s/}, upstream: secure}
      - {name: untrusted, match: {path_prefix: /u/}, upstream: untrusted}
    """
    p = await proxy_factory(text, URL=tls_upstream.url, CA=ca_file)
    tls_upstream.push(Reply(body=b"over tls"))
    async with http.get(p.url + "/s/x") as resp:
        assert resp.status == 200
        assert await resp.read() == b"over tls"
    assert tls_upstream.requests[-1].header("Host") == f"localhost:{tls_upstream.port}"
    async with http.get(p.url + "/u/x") as resp:  # verification on by default
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "connect-failure"
    assert len(tls_upstream.requests) == 1


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def test_100mb_streams_both_ways_with_bounded_memory(proxy_factory, tmp_path: Path):
    """100 MB up and 100 MB down through the proxy; the process must not buffer them."""
    from aiohttp import web

    size = 100 * 1024 * 1024
    chunk = b"z" * (256 * 1024)
    received = hashlib.sha256()
    got = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal got
        if request.method == "POST":
            async for part in request.content.iter_chunked(256 * 1024):
                received.update(part)
                got += len(part)
            return web.Response(text=str(got))
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        return resp

    app = web.Application(client_max_size=2 * size)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        text = BASIC.replace("routes:", "limits: {max_request_body: 200MiB}\nroutes:")
        p = await proxy_factory(text, URL=f"http://127.0.0.1:{port}")
        before = _rss_kib()
        peak = before

        async def body():
            nonlocal peak
            for _ in range(size // len(chunk)):
                yield chunk
                peak = max(peak, _rss_kib())

        async with aiohttp.ClientSession() as s:
            async with s.post(p.url + "/fwd/up", data=body(), headers={"Content-Length": str(size)}) as resp:
                assert resp.status == 200
                assert int(await resp.text()) == size
            down = 0
            async with s.get(p.url + "/fwd/down") as resp:
                async for part in resp.content.iter_chunked(1 << 20):
                    down += len(part)
                    peak = max(peak, _rss_kib())
            assert down == size
        # Client, proxy and upstream share this process: all of them together stay far
        # below the 100 MB that buffering either body would cost.
        assert peak - before < 60 * 1024, f"RSS grew by {(peak - before) // 1024} MiB"
    finally:
        await runner.cleanup()


async def test_keep_alive_pool_reuses_upstream_connections(basic, upstream, http):
    for _ in range(20):
        async with http.get(basic.url + "/api/k") as resp:
            await resp.read()
    assert upstream.connections <= 2


async def test_failing_upstream_leaks_no_file_descriptors(basic, upstream, http):
    def fds() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/fd"))

    for _ in range(3):  # warm up pools
        async with http.get(basic.url + "/api/warm") as resp:
            await resp.read()
    start = fds()
    actions = ["reset-before-head", "reset-after-head", "close-mid-body"]
    for i in range(60):
        upstream.push(Reply(body=b"q" * 1000, action=actions[i % 3]))
        try:
            async with http.get(basic.url + f"/api/f{i}") as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
    await asyncio.sleep(0.2)
    assert fds() - start < 10
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fds() < soft


async def test_max_connections_queues_instead_of_failing(proxy_factory, upstream, http):
    text = BASIC.replace("  fwd:\n    url: {URL}/base/", "  fwd:\n    url: {URL}/base/\n    max_connections: 2")
    p = await proxy_factory(text, URL=upstream.url)
    upstream.default = Reply(delay=0.2, body=b"slow")

    async def one(i):
        async with http.get(p.url + f"/fwd/{i}") as resp:
            return resp.status, await resp.read()

    results = await asyncio.gather(*(one(i) for i in range(6)))
    assert results == [(200, b"slow")] * 6
    assert upstream.connections == 2  # the pool never opened a third connection
    client = p.app.registry.clients["fwd"]
    assert client.open_connections == 2 and client.in_flight == 0


async def test_connection_close_from_upstream_is_not_reused(basic, upstream, http):
    upstream.push(Reply(headers={"Connection": "close"}, body=b"one"))
    async with http.get(basic.url + "/api/1") as resp:
        assert await resp.read() == b"one"
        assert "Connection" not in resp.headers or resp.headers["Connection"] != "close"
    upstream.push(Reply(body=b"two"))
    async with http.get(basic.url + "/api/2") as resp:
        assert resp.status == 200 and await resp.read() == b"two"
    assert upstream.connections == 2


async def test_idle_connection_closed_by_the_upstream_is_replaced(basic, upstream, http):
    async with http.get(basic.url + "/api/warm") as resp:
        await resp.read()
    for writer in list(upstream._writers):  # the upstream drops its idle keep-alive connection
        writer.transport.abort()
    await asyncio.sleep(0.05)
    async with http.get(basic.url + "/api/again") as resp:
        assert resp.status == 200
        assert resp.headers["X-Resilience-Attempts"] == "1"

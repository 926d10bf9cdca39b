"""The upstream pool end to end: the stale keep-alive race, idle_timeout, HEAD reuse."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.proxy import poll
from tests.support.upstream import Reply, ScriptedUpstream

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  u: {url: "{URL}", idle_timeout: {IDLE}}
routes:
  - {name: r, match: {path_prefix: /r/}, upstream: u, timeout: {total: 5s, per_try: 5s}}
  - name: once                                  # bodies buffered (replayable), one attempt
    match: {path_prefix: /once/}
    upstream: u
    retry: {max_attempts: 1}
"""


@pytest.fixture
async def closing_upstream():
    server = await ScriptedUpstream(idle_close=0.1).start()
    yield server
    await server.close()


async def test_an_upstream_closing_idle_connections_never_causes_a_502(
    proxy_factory, closing_upstream, http
):
    # The upstream closes a connection idle for 0.1 s; each request comes 0.1 s after the
    # previous answer, so some are written just as the upstream closes (DESIGN §5).
    proxy = await proxy_factory(CONFIG, URL=closing_upstream.url, IDLE="4s")
    statuses = []
    for i in range(40):
        async with http.get(f"{proxy.url}/r/{i}") as resp:
            statuses.append(resp.status)
            await resp.read()
        await asyncio.sleep(0.1)
    assert statuses.count(502) == 0, statuses
    assert len(closing_upstream.requests) >= 40


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, URL=upstream.url, IDLE="4s")


async def _warm(http, proxy, upstream):
    """One request, so that the next one goes out on a reused pooled connection."""
    async with http.get(proxy.url + "/r/warm") as resp:
        assert resp.status == 200
    assert upstream.connections == 1


async def test_a_get_reset_on_a_reused_connection_is_sent_once_more(proxy, upstream, http):
    await _warm(http, proxy, upstream)
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"second"))
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 200
        assert await resp.read() == b"second"
        assert resp.headers["X-Resilience-Attempts"] == "1"  # not a retry attempt
    assert [s.target for s in upstream.requests] == ["/warm", "/x", "/x"]
    assert upstream.connections == 2
    text = await _metrics(http, proxy)
    assert 'upstream_attempts_total{result="ok",route="r",upstream="u"} 2.0' in text
    assert 'upstream_attempts_total{result="reset",route="r",upstream="u"} 0.0' in text


async def test_a_post_whose_body_was_written_is_not_resent(proxy, upstream, http):
    await _warm(http, proxy, upstream)
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"never"))
    async with http.post(proxy.url + "/r/charge", data=b"once") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "reset"
    assert [s.method for s in upstream.requests] == ["GET", "POST"]


async def test_a_replayable_post_whose_body_was_written_is_not_resent(proxy, upstream, http):
    await _warm(http, proxy, upstream)
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"never"))
    async with http.post(proxy.url + "/once/charge", data=b"once") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "reset"
    assert [s.method for s in upstream.requests] == ["GET", "POST"]


@pytest.mark.parametrize("key", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_a_post_with_an_idempotency_key_is_resent(proxy, upstream, http, key):
    await _warm(http, proxy, upstream)
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"done"))
    async with http.post(proxy.url + "/once/charge", data=b"once", headers={key: "k-1"}) as resp:
        assert resp.status == 200
        assert await resp.read() == b"done"
    assert [(s.method, s.body) for s in upstream.requests[1:]] == [
        ("POST", b"once"),
        ("POST", b"once"),
    ]


async def test_a_streamed_post_with_an_idempotency_key_is_not_resent(proxy, upstream, http):
    # On a route without retries the body streams: once read, it cannot be sent again.
    await _warm(http, proxy, upstream)
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"never"))
    headers = {"Idempotency-Key": "k-1"}
    async with http.post(proxy.url + "/r/charge", data=b"once", headers=headers) as resp:
        assert resp.status == 502
    assert len(upstream.requests) == 2


async def test_a_reset_on_a_fresh_connection_is_a_failure(proxy, upstream, http):
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"never"))
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "reset"
    assert len(upstream.requests) == 1


async def test_pooled_connections_close_after_idle_timeout(proxy_factory, upstream, http):
    proxy = await proxy_factory(CONFIG, URL=upstream.url, IDLE="300ms")
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 200
    loop = asyncio.get_running_loop()
    answered = loop.time()
    assert upstream.open_connections == 1  # kept alive in the pool
    await poll(lambda: upstream.open_connections == 0, timeout=3)  # no new request needed
    assert loop.time() - answered >= 0.25
    async with http.get(proxy.url + "/r/y") as resp:  # and the next request opens a new one
        assert resp.status == 200
    assert upstream.connections == 2


async def test_head_with_a_length_then_get_on_the_same_connection(proxy, upstream, http):
    upstream.push(Reply(headers={"Content-Length": "1234"}), Reply(body=b"body"))
    async with http.head(proxy.url + "/r/x") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1234"
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 200
        assert await resp.read() == b"body"
    assert [s.method for s in upstream.requests] == ["HEAD", "GET"]
    assert upstream.connections == 1


async def test_an_unasked_101_is_a_502_upstream_status(proxy, upstream, http):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    upstream.push(Reply(raw=raw))
    async with http.get(proxy.url + "/r/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "upstream-status"
    text = await _metrics(http, proxy)
    assert 'upstream_attempts_total{result="status",route="r",upstream="u"} 1.0' in text
    assert 'requests_total{code="502",method="GET",outcome="upstream-status",route="r"} 1.0' in text
    await poll(lambda: upstream.open_connections == 0)  # that connection is never reused


BAD_FRAMING = {
    "content-length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "conflicting-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\nhi",
    "list-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nhi",
    "unparsable-head": b"HTTP/1.1 OK\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nhi",
    "http-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("raw", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
async def test_bad_response_framing_is_a_502_and_the_connection_is_dropped(
    proxy, upstream, http, raw
):
    await _warm(http, proxy, upstream)
    upstream.push(Reply(raw=raw))
    async with http.get(proxy.url + "/r/bad") as resp:
        assert resp.status == 502
        assert resp.headers["X-Resilience-Reason"] == "reset"
    await poll(lambda: upstream.open_connections == 0)
    async with http.get(proxy.url + "/r/after") as resp:
        assert resp.status == 200
    assert upstream.connections == 2  # the bad connection was not reused
    assert len(upstream.requests) == 3  # and the bad answer was not "retried" as stale


async def _metrics(http, proxy) -> str:
    async with http.get(proxy.admin + "/metrics") as resp:
        return await resp.text()

"""The upstream client against real servers on loopback (proxy/upstream.py).

Parsing (interim responses, HEAD, bad framing), flow control both ways, the pool (idle
timer, limit, FIFO waiters, cancellation), the stale keep-alive resend and failure causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict

from proxy.config.model import TlsSettings, Upstream
from proxy.upstream import (
    BODY_HIGH_WATER,
    UpstreamBodyError,
    UpstreamClient,
    UpstreamFailure,
    UpstreamResponse,
)
from tests.support.proxy import free_port, poll
from tests.support.upstream import Reply, ScriptedUpstream


def make_client(url: str, **settings: object) -> UpstreamClient:
    scheme, _, rest = url.partition("://")
    upstream = Upstream(name="u", url=url, scheme=scheme, host=rest, base_path="", **settings)  # type: ignore[arg-type]
    return UpstreamClient(upstream)


@pytest.fixture
async def client(upstream: ScriptedUpstream) -> AsyncIterator[UpstreamClient]:
    c = make_client(upstream.url)
    yield c
    await c.close()


def hdrs(**values: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(Host="upstream")
    for name, value in values.items():
        out[name.replace("_", "-")] = value
    return out


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while True:
        chunk = await response.content.readany()
        if not chunk:
            break
        parts.append(chunk)
    response.release()
    return b"".join(parts)


async def get(
    client: UpstreamClient, path: str = "/", method: str = "GET", **kw: object
) -> tuple[int, bytes]:
    response = await client.send(method, path, hdrs(), None, **kw)  # type: ignore[arg-type]
    return response.status, await read_all(response)


# -- parsing ---------------------------------------------------------------------------------


async def test_head_with_a_length_then_get_reuse_one_connection(client, upstream):
    upstream.push(Reply(headers={"Content-Length": "5000"}), Reply(body=b"the body"))
    response = await client.send("HEAD", "/h", hdrs(), None)
    assert response.status == 200
    assert response.headers["Content-Length"] == "5000"
    assert response.content.is_eof()
    assert response.content.read_nowait() == b""
    response.release()
    assert await get(client, "/g") == (200, b"the body")
    assert upstream.connections == 1
    assert client.open_connections == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_end_at_the_head(client, upstream, status):
    upstream.push(
        Reply(status=status, headers={"Content-Length": "10"}, body=b""), Reply(body=b"next")
    )
    response = await client.send("GET", "/", hdrs(), None)
    assert response.status == status and response.content.is_eof()
    response.release()
    assert await get(client) == (200, b"next")
    assert upstream.connections == 1


async def test_100_continue_is_consumed_and_103_goes_to_on_interim(client, upstream):
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    upstream.push(Reply(raw=raw))
    seen: list[tuple[int, list[tuple[str, str]]]] = []
    response = await client.send(
        "GET", "/", hdrs(), None, on_interim=lambda s, h: seen.append((s, h))
    )
    assert response.status == 200
    assert await read_all(response) == b"ok"
    assert seen == [(103, [("Link", "</style.css>; rel=preload")])]


async def test_an_async_on_interim_is_awaited(client, upstream):
    raw = b"HTTP/1.1 103 EH\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    upstream.push(Reply(raw=raw))
    seen = []

    async def hook(status: int, fields: list[tuple[str, str]]) -> None:
        await asyncio.sleep(0)
        seen.append(status)

    response = await client.send("GET", "/", hdrs(), None, on_interim=hook)
    assert (response.status, seen) == (204, [103])
    response.release()


async def test_an_unasked_101_is_an_upstream_status_failure(client, upstream):
    upstream.push(Reply(raw=b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"))
    with pytest.raises(UpstreamFailure) as info:
        await client.send("GET", "/", hdrs(), None)
    assert info.value.kind == "upstream-status"
    assert "101" in info.value.cause
    assert client.open_connections == 0


BAD = {
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Content-Length",
    ),
    "conflicting-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
        "Content-Length",
    ),
    "unparsable-head": (b"HTTP/1.1 abc\r\n\r\n", "bad response framing"),
    "status-over-599": (b"HTTP/1.1 999 X\r\nContent-Length: 0\r\n\r\n", "status 999"),
    "not-http-1": (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP/1.x"),
}


@pytest.mark.parametrize(("raw", "what"), BAD.values(), ids=BAD.keys())
async def test_bad_framing_is_a_reset_and_the_connection_is_closed(client, upstream, raw, what):
    assert await get(client) == (200, b"ok")
    upstream.push(Reply(raw=raw))
    with pytest.raises(UpstreamFailure) as info:
        await client.send("GET", "/", hdrs(), None)
    assert info.value.kind == "reset"
    assert info.value.cause.startswith("bad response framing: ")
    assert what in info.value.cause
    assert client.open_connections == 0
    await poll(lambda: upstream.open_connections == 0)
    assert await get(client) == (200, b"ok")
    assert upstream.connections == 2
    assert len(upstream.requests) == 3  # bytes arrived: never resent as a stale race


async def test_a_huge_response_head_is_bad_framing(client, upstream):
    upstream.push(Reply(raw=b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 100_000 + b"\r\n\r\n"))
    with pytest.raises(UpstreamFailure) as info:
        await client.send("GET", "/", hdrs(), None)
    assert info.value.kind == "reset" and "head larger than" in info.value.cause


async def test_obs_text_passes_byte_for_byte_both_ways(client, upstream):
    upstream.push(
        Reply(raw=b"HTTP/1.1 200 OK\r\nX-Euro: \xe2\x82\xac\r\nContent-Length: 0\r\n\r\n")
    )
    sent = b"caf\xc3\xa9".decode("latin-1")
    response = await client.send("GET", "/", hdrs(X_Name=sent), None)
    assert response.headers["X-Euro"].encode("latin-1") == b"\xe2\x82\xac"
    response.release()
    assert upstream.requests[-1].header("X-Name").encode("latin-1") == b"caf\xc3\xa9"


async def test_a_body_delimited_by_the_connection_end(client, upstream):
    upstream.push(
        Reply(raw=b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", close=True)
    )
    assert await get(client) == (200, b"until the end")
    assert client.open_connections == 0


async def test_a_body_cut_short_raises_upstream_body_error(client, upstream):
    upstream.push(Reply(body=b"x" * 10_000, action="close-mid-body"))
    response = await client.send("GET", "/", hdrs(), None)
    with pytest.raises(UpstreamBodyError):
        while await response.content.readany():
            pass
    response.close()
    assert client.open_connections == 0


async def test_connection_close_is_honoured(client, upstream):
    upstream.push(Reply(headers={"Connection": "close"}, body=b"one"))
    assert await get(client) == (200, b"one")
    assert client.open_connections == 0
    assert await get(client) == (200, b"ok")
    assert upstream.connections == 2


# -- request framing -------------------------------------------------------------------------


async def test_request_framing(client, upstream):
    for method, body, length in [
        ("POST", None, None),
        ("GET", None, None),
        ("PUT", b"abc", None),
    ]:
        (await client.send(method, "/", hdrs(), body, length)).release()

    async def stream() -> AsyncIterator[bytes]:
        yield b"12"
        yield b"345"

    (await client.send("PUT", "/", hdrs(), stream(), None)).release()
    (await client.send("PUT", "/", hdrs(), stream(), 5)).release()
    seen = [
        (s.header("Content-Length"), s.header("Transfer-Encoding"), s.body)
        for s in upstream.requests
    ]
    assert seen == [
        ("0", None, b""),
        (None, None, b""),
        ("3", None, b"abc"),
        (None, "chunked", b"12345"),
        ("5", None, b"12345"),
    ]


async def test_url_userinfo_is_sent_as_basic_auth(upstream):
    c = make_client(upstream.url, userinfo=("user", "pa:ss"))
    try:
        (await c.send("GET", "/", hdrs(), None)).release()
        injected = make_client(
            upstream.url, userinfo=("user", "x"), headers=(("Authorization", "Bearer t"),)
        )
        (await injected.send("GET", "/", hdrs(Authorization="Bearer t"), None)).release()
        await injected.close()
    finally:
        await c.close()
    assert upstream.requests[0].header("Authorization") == "Basic dXNlcjpwYTpzcw=="
    assert upstream.requests[1].header("Authorization") == "Bearer t"


# -- flow control ----------------------------------------------------------------------------


async def test_reading_pauses_while_the_caller_reads_slowly(client, upstream):
    size = 16 * 1024 * 1024
    upstream.push(Reply(body=b"z" * size))
    response = await client.send("GET", "/", hdrs(), None)
    await asyncio.sleep(0.3)  # the caller does not read: only the buffer limit holds
    buffered = len(response.content.read_nowait())
    assert buffered <= BODY_HIGH_WATER + 512 * 1024
    total = buffered + len(await read_all(response))
    assert total == size


async def test_request_body_writes_wait_for_a_slow_upstream():
    reading = asyncio.Event()
    received = 0
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reading.wait()
        while received < length:
            received += len(await reader.read(1 << 20))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = make_client(f"http://127.0.0.1:{port}")
    pulled = 0
    chunk = b"u" * 65536
    total = 64 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < total:
            pulled += len(chunk)
            yield chunk

    try:
        task = asyncio.create_task(c.send("PUT", "/", hdrs(), body(), total))
        await asyncio.sleep(0.5)
        assert pulled < 32 * 1024 * 1024  # kernel buffers plus the transport's, no more
        reading.set()
        response = await task
        assert response.status == 200 and received == total
        response.release()
    finally:
        await c.close()
        server.close()
        await server.wait_closed()


# -- the pool --------------------------------------------------------------------------------


async def test_idle_connections_close_after_idle_timeout(upstream):
    c = make_client(upstream.url, idle_timeout=0.2)
    try:
        assert await get(c) == (200, b"ok")
        assert c.open_connections == 1 and upstream.open_connections == 1
        await poll(lambda: c.open_connections == 0 and upstream.open_connections == 0, timeout=3)
        assert await get(c) == (200, b"ok")
        assert upstream.connections == 2
    finally:
        await c.close()


async def test_a_connection_the_upstream_closes_while_idle_leaves_the_pool(client, upstream):
    upstream.push(Reply(body=b"one"))
    assert await get(client) == (200, b"one")
    for writer in list(upstream._writers):
        writer.close()
    await poll(lambda: client.open_connections == 0)


async def test_the_pool_limit_serves_waiters_in_order(upstream):
    c = make_client(upstream.url, max_connections=1)
    upstream.default = Reply(delay=0.05)
    order: list[int] = []

    async def one(i: int) -> None:
        status, _ = await get(c, f"/{i}")
        order.append(i)

    try:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]
        assert upstream.connections == 1
    finally:
        await c.close()


async def test_a_cancelled_waiter_leaks_no_slot(upstream):
    c = make_client(upstream.url, max_connections=1)
    upstream.push(Reply(delay=0.2))
    try:
        first = asyncio.create_task(get(c, "/slow"))
        await poll(lambda: len(upstream.requests) == 1)
        waiter = asyncio.create_task(get(c, "/cancelled"))
        await asyncio.sleep(0.02)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert await first == (200, b"ok")
        assert await get(c, "/after") == (200, b"ok")
        assert c.open_connections == 1
        assert [s.target for s in upstream.requests] == ["/slow", "/after"]
    finally:
        await c.close()


# -- the stale keep-alive race -----------------------------------------------------------------


async def test_a_stale_get_is_resent_once_on_a_fresh_connection(client, upstream):
    assert await get(client) == (200, b"ok")
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"fresh"))
    assert await get(client, "/again") == (200, b"fresh")
    assert client.stale_resends == 1
    assert upstream.connections == 2
    assert client.open_connections == 1


async def test_a_second_reset_is_a_failure(client, upstream):
    assert await get(client) == (200, b"ok")
    upstream.push(Reply(action="reset-before-head"), Reply(action="reset-before-head"))
    with pytest.raises(UpstreamFailure) as info:
        await get(client, "/again")
    assert info.value.kind == "reset"
    assert info.value.cause in (
        "connection reset before the response head",
        "connection closed before the response head",
    )
    assert client.open_connections == 0


async def test_a_written_post_without_a_key_is_not_resent(client, upstream):
    assert await get(client) == (200, b"ok")
    upstream.push(Reply(action="reset-before-head"), Reply(body=b"twice"))
    with pytest.raises(UpstreamFailure):
        await client.send("POST", "/pay", hdrs(), b"amount=1")
    assert [s.method for s in upstream.requests] == ["GET", "POST"]
    with_key = hdrs(Idempotency_Key="k")
    upstream.push(Reply(body=b"one"))  # the failed POST's connection is gone: a fresh one
    assert (await client.send("POST", "/pay", with_key, b"amount=1")).status == 200


# -- failure causes ----------------------------------------------------------------------------


async def test_cause_of_a_refused_connection():
    c = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamFailure) as info:
        await c.send("GET", "/?secret=1", hdrs(), None)
    assert (info.value.kind, info.value.before_request) == ("connect-failure", True)
    assert info.value.cause == "ECONNREFUSED"
    await c.close()


async def test_cause_of_an_untrusted_certificate(tls_upstream):
    port = tls_upstream.port
    c = make_client(f"https://localhost:{port}")
    with pytest.raises(UpstreamFailure) as info:
        await c.send("GET", "/", hdrs(), None)
    assert info.value.kind == "connect-failure"
    assert info.value.cause.startswith("CERTIFICATE_VERIFY_FAILED: ")
    assert "issuer" in info.value.cause
    await c.close()


async def test_tls_with_the_ca_file_and_without_verification(tls_upstream, ca_file):
    url = f"https://localhost:{tls_upstream.port}"
    for tls in (TlsSettings(ca_file=str(ca_file)), TlsSettings(verify=False)):
        c = make_client(url, tls=tls)
        assert await get(c) == (200, b"ok")
        await c.close()


async def test_cause_of_a_connect_timeout():
    # A listener whose accept queue is full: the kernel drops further SYNs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.05)
        c = make_client(f"http://127.0.0.1:{port}", connect_timeout=0.2)
        with pytest.raises(UpstreamFailure) as info:
            await c.send("GET", "/", hdrs(), None)
        assert info.value.kind == "connect-failure"
        assert info.value.cause == "timeout after 0.20s"
        await c.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_certificate_error_names_the_reason():
    from proxy.upstream import connect_cause

    exc = ssl.SSLCertVerificationError(1, "x")
    exc.verify_message = "certificate has expired"
    assert connect_cause(exc, 2.0) == "CERTIFICATE_VERIFY_FAILED: certificate has expired"
    assert (
        connect_cause(OSError("Multiple exceptions: [Errno 111] a, [Errno 111] b"), 2.0)
        == "ECONNREFUSED"
    )


async def test_a_cancelled_attempt_closes_its_connection_and_frees_the_slot(upstream):
    c = make_client(upstream.url, max_connections=1)
    upstream.push(Reply(action="hang"))
    try:
        task = asyncio.create_task(c.send("GET", "/hang", hdrs(), None))
        await poll(lambda: len(upstream.requests) == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert c.open_connections == 0
        await poll(lambda: upstream.cancelled == 1)  # the upstream saw the connection close
        assert await get(c, "/next") == (200, b"ok")
    finally:
        await c.close()


async def test_close_closes_idle_connections_and_refuses_reuse(upstream):
    c = make_client(upstream.url)
    assert await get(c) == (200, b"ok")
    await c.close()
    assert c.closed and c.open_connections == 0
    await poll(lambda: upstream.open_connections == 0)


async def test_a_head_answered_with_a_body_is_not_reused(client, upstream):
    # A server that wrongly sends a body after a HEAD head: the bytes cannot be told from
    # the next response, so the connection goes.
    upstream.push(Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"))
    response = await client.send("HEAD", "/", hdrs(), None)
    assert response.status == 200 and response.headers["Content-Length"] == "4"
    response.release()
    assert client.open_connections == 0
    assert await get(client) == (200, b"ok")
    assert upstream.connections == 2


async def test_each_idle_connection_expires_after_its_own_last_use(upstream):
    c = make_client(upstream.url, idle_timeout=0.4)
    upstream.default = Reply(delay=0.05)
    try:
        await asyncio.gather(get(c, "/a"), get(c, "/b"))  # two connections, idle together
        assert c.open_connections == 2
        await asyncio.sleep(0.2)
        assert await get(c, "/c") == (200, b"ok")  # one of them is used again
        loop = asyncio.get_running_loop()
        reused_at = loop.time()
        await poll(lambda: c.open_connections == 1, timeout=2)  # the other one expired
        assert upstream.open_connections == 1
        await poll(lambda: c.open_connections == 0, timeout=2)  # then the reused one,
        # well after the other one (0.2 s after the reuse): timed from its own last use
        assert loop.time() - reused_at >= 0.3
        await poll(lambda: upstream.open_connections == 0)
    finally:
        await c.close()


async def test_failures_leak_no_connection_and_no_file_descriptor(client, upstream):
    import os

    assert await get(client) == (200, b"ok")
    fds = len(os.listdir("/proc/self/fd"))
    failures = [
        Reply(action="reset-before-head"),
        Reply(action="reset-after-head"),
        Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"),
        Reply(raw=b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
        Reply(body=b"y" * 5000, action="close-mid-body"),
    ]
    for _ in range(10):
        for failure in failures:
            upstream.push(failure, failure)  # twice: a reset may be resent once
            with contextlib.suppress(UpstreamFailure, UpstreamBodyError):
                response = await client.send("GET", "/", hdrs(), None)
                try:
                    while await response.content.readany():
                        pass
                finally:
                    response.close()
            upstream.replies.clear()
            assert await get(client) == (200, b"ok")
    assert client.open_connections == 1
    await poll(lambda: upstream.open_connections == 1)
    assert len(os.listdir("/proc/self/fd")) <= fds

"""The proxy listener's connection guarantees (proxy/server/protocol.py): keep-alive,
pipelining in order, HTTP/1.0, idle timeout, flow control both ways, interim answers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct

import aiohttp

from proxy.config.model import Limits
from proxy.errors import ProxyError
from proxy.server.protocol import ProxyListener, Request
from tests.support.proxy import poll
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
limits: {client_idle_timeout: 400ms, max_request_body: 200MiB}
upstreams:
  api: {url: "{URL}"}
routes:
  - {name: api, match: {path_prefix: /api/}, upstream: api, timeout: {total: 30s, per_try: 30s}}
"""


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length-framed answer: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    match = re.search(rb"(?i)content-length: (\d+)", head)
    assert match, head
    body = await asyncio.wait_for(reader.readexactly(int(match.group(1))), 5)
    return head, body


async def test_pipelined_requests_are_answered_in_order(proxy_factory, upstream):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    # The first answer is the slowest: the later ones must still wait their turn.
    upstream.default = lambda seen: Reply(body=seen.target.encode(), delay=0.2 if seen.target == "/1" else 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"".join(b"GET /api/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
        bodies = [(await read_answer(reader))[1] for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]
        # ... and the connection is still usable afterwards.
        writer.write(b"GET /api/4 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader))[1] == b"/4"
    finally:
        writer.close()
    assert [r.target for r in upstream.requests] == ["/1", "/2", "/3", "/4"]


async def test_keep_alive_until_the_idle_timeout_then_closed(proxy_factory, upstream):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    loop = asyncio.get_running_loop()
    try:
        writer.write(b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_answer(reader)
        assert b"connection: close" not in head.lower()
        began = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        assert 0.3 <= loop.time() - began < 3
    finally:
        writer.close()


async def test_connection_close_and_http10_framing(proxy_factory, upstream):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    for request, keep in [
        (b"GET /api/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET /api/a HTTP/1.0\r\nHost: x\r\n\r\n", False),
        (b"GET /api/a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", True),
    ]:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        try:
            writer.write(request)
            head, body = await read_answer(reader)
            assert body == b"ok"
            assert head.startswith(b"HTTP/1.1 200")
            if keep:
                assert b"connection: keep-alive" in head.lower()
                writer.write(request)
                assert (await read_answer(reader))[1] == b"ok"  # served again on it
            else:
                assert b"connection: close" in head.lower()
                assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()


async def test_http10_client_gets_a_close_delimited_stream(proxy_factory, upstream):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    upstream.push(Reply(body=b"z" * 300_000, chunked=True, chunks=30, chunk_delay=0.005))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(b"GET /api/s HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"z" * 300_000


async def test_expect_100_continue_is_not_sent_for_a_body_over_the_limit(proxy_factory, upstream):
    p = await proxy_factory(CONFIG.replace("200MiB", "1KiB"), URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    try:
        writer.write(
            b"POST /api/u HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        raw = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert statuses(raw) == [413]
    assert upstream.requests == []


async def _slow_upstream(read_body: bool, send: int = 0):
    """A raw upstream that reads only the head (and then nothing), or that answers with
    `send` bytes as fast as its socket lets it; it counts what it managed to write."""
    state = {"sent": 0, "closed": asyncio.Event()}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if send:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % send)
                chunk = b"d" * 65536
                while state["sent"] < send:
                    writer.write(chunk)
                    state["sent"] += len(chunk)
                    await writer.drain()
            elif read_body:
                await reader.read()  # until the proxy closes
            else:
                writer.transport.pause_reading()  # a stalled upstream: reads nothing more
                await asyncio.Event().wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            state["closed"].set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, state


async def _stop(server: asyncio.base_events.Server) -> None:
    server.close()
    if hasattr(server, "close_clients"):
        server.close_clients()


async def test_upload_to_a_stalled_upstream_pauses_reading_the_client(proxy_factory):
    server, state = await _slow_upstream(read_body=False)
    port = server.sockets[0].getsockname()[1]
    p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{port}")
    size = 150 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"POST /api/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    chunk = b"u" * 65536
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while sent < size:
                    writer.write(chunk)
                    sent += len(chunk)
                    await writer.drain()
        # Socket buffers hold some megabytes (about 9 MiB measured here); the proxy itself
        # must not have soaked up the rest (it paused reading once its own buffer passed
        # the high-water mark).
        assert sent < 40 * 1024 * 1024, f"the proxy kept reading: {sent >> 20} MiB accepted"
        client = p.app.registry.clients["api"]
        assert client.in_flight == 1
        # The client dies (its kernel resets the connection: with unsent data a plain
        # close would wait for the proxy's zero window): the upstream attempt goes with it.
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await poll(lambda: client.in_flight == 0)
    finally:
        writer.close()
        server.close()


async def test_slow_reader_back_pressure_reaches_the_upstream(proxy_factory):
    size = 150 * 1024 * 1024
    server, state = await _slow_upstream(read_body=True, send=size)
    port = server.sockets[0].getsockname()[1]
    p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port, limit=1 << 20)
    try:
        writer.write(b"GET /api/down HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.transport.pause_reading()  # a client that stops reading
        await asyncio.sleep(1.5)
        assert state["sent"] < 40 * 1024 * 1024, f"{state['sent'] >> 20} MiB buffered"
        writer.transport.resume_reading()
        got = 0
        async with asyncio.timeout(30):
            while got < size:
                data = await reader.read(1 << 20)
                assert data
                got += len(data)
        assert got == size
    finally:
        writer.close()
        server.close()


async def test_client_going_away_mid_stream_releases_the_upstream(proxy_factory):
    size = 150 * 1024 * 1024
    server, state = await _slow_upstream(read_body=True, send=size)
    port = server.sockets[0].getsockname()[1]
    p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        async with http.get(p.url + "/api/down") as resp:
            await resp.content.read(1 << 20)
    await asyncio.wait_for(state["closed"].wait(), 5)
    assert state["sent"] < size
    server.close()


class _Hints:
    """A minimal application on the real listener: 103 then 200."""

    def limits(self) -> Limits:
        return Limits()

    def underscores(self) -> str:
        return "reject"

    async def handle(self, request: Request) -> None:
        request.send_interim(103, "Link: </style.css>; rel=preload\r\n")
        request.send_whole(200, "OK", b"Content-Type: text/plain\r\n", b"done")

    def refuse(self, request: Request, error: ProxyError) -> None:
        request.send_whole(error.status, "", b"", error.body())


async def test_early_hints_go_to_http11_clients_only():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ProxyListener(_Hints()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for version, expected in [(b"1.1", [103, 200]), (b"1.0", [200])]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            assert statuses(raw) == expected, raw
            assert raw.endswith(b"done")
            if version == b"1.1":
                assert b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" in raw
    finally:
        server.close()


async def test_a_refused_upload_still_gets_its_answer(proxy_factory, upstream):
    """413 while the client keeps sending: the answer must survive (a lingering close,
    not a reset that would throw the answer away before the client read it)."""
    p = await proxy_factory(CONFIG.replace("200MiB", "64KiB"), URL=upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)

    async def keep_sending() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"b" * 65536)
                await writer.drain()

    # Chunked: the size is only known to be too large once 64 KiB have arrived.
    writer.write(b"POST /api/u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n" % (20 * 1024 * 1024))
    sender = asyncio.create_task(keep_sending())
    try:
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        sender.cancel()
        writer.close()
    assert statuses(raw) == [413]
    assert raw.endswith(b"}")  # the whole JSON body arrived
    assert upstream.requests == []


async def test_answers_carry_a_date(proxy_factory, upstream, http):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    async with http.get(p.url + "/api/a") as resp:  # the upstream sent none: appended
        assert resp.headers["Date"].endswith(" GMT")
    upstream.push(Reply(headers={"Date": "Tue, 01 Dec 2026 10:00:00 GMT"}))
    async with http.get(p.url + "/api/b") as resp:  # the upstream's own is kept, once
        assert resp.headers.getall("Date") == ["Tue, 01 Dec 2026 10:00:00 GMT"]
    async with http.get(p.url + "/nowhere") as resp:
        assert resp.status == 404 and resp.headers["Date"].endswith(" GMT")

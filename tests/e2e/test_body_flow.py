"""Request-body flow control of the listener (proxy/server/protocol.py `BodyStream`): reading
pauses at `BODY_HIGH_WATER` buffered and resumes only when the reader waits for more, so an
upload holds about one read of body in the proxy; parts are handed over without copies."""

from __future__ import annotations

import asyncio
import hashlib

from proxy.config.model import Limits
from proxy.errors import ProxyError
from proxy.server.protocol import BODY_HIGH_WATER, HttpConnection, ProxyListener, Request
from tests.support.proxy import poll


class _Reader:
    """An application that reads each request body one `readany` at a time, when the test
    says so (`step`), and answers with the body's length and SHA-256."""

    def __init__(self) -> None:
        self.steps: asyncio.Queue[None] = asyncio.Queue()
        self.pieces: list[int] = []  # len() of what each readany returned
        self.taken: asyncio.Queue[int] = asyncio.Queue()

    def limits(self) -> Limits:
        return Limits()

    def underscores(self) -> str:
        return "reject"

    async def handle(self, request: Request) -> None:
        assert request.body is not None
        digest = hashlib.sha256()
        size = 0
        while True:
            await self.steps.get()
            data = await request.body.readany()
            self.pieces.append(len(data))
            await self.taken.put(len(data))
            if not data:
                break
            digest.update(data)
            size += len(data)
        text = f"{size} {digest.hexdigest()}".encode()
        request.send_whole(200, "OK", b"Content-Type: text/plain\r\n", text)

    def refuse(self, request: Request, error: ProxyError) -> None:
        request.send_whole(error.status, "", b"", error.body())


async def _serve(app: _Reader) -> tuple[asyncio.Server, ProxyListener, int]:
    listener = ProxyListener(app)
    server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    return server, listener, server.sockets[0].getsockname()[1]


def _reading(listener: ProxyListener) -> bool:
    (conn,) = listener.connections
    assert isinstance(conn, HttpConnection)
    transport = conn._transport
    assert transport is not None
    return transport.is_reading()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return await asyncio.wait_for(reader.readexactly(length), 5)


async def test_taking_a_chunk_does_not_resume_reading_until_the_reader_waits():
    app = _Reader()
    server, listener, port = await _serve(app)
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sender = asyncio.create_task(_send(writer, body))
        await poll(lambda: len(listener.connections) == 1 and not _reading(listener))
        app.steps.put_nowait(None)
        assert await app.taken.get() > 0
        # The reader holds a chunk (it would be writing it upstream now): the next read of
        # the client's body must wait in the kernel, not in the proxy.
        assert not _reading(listener)
        while True:
            app.steps.put_nowait(None)
            if not await app.taken.get():
                break
        assert await _answer(reader) == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        await sender
        assert max(app.pieces) <= 256 * 1024  # one read at most: never two joined
    finally:
        writer.close()
        server.close()


async def test_small_chunks_are_joined_up_to_the_high_water_mark():
    app = _Reader()
    server, listener, port = await _serve(app)
    pieces = [bytes([i % 251]) * 1000 for i in range(1000)]  # 1,000 chunks of 1,000 bytes
    framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sender = asyncio.create_task(_send(writer, framed))
        await poll(lambda: len(listener.connections) == 1 and not _reading(listener))
        app.steps.put_nowait(None)
        first = await app.taken.get()
        assert 1000 < first <= BODY_HIGH_WATER  # many parts, one piece
        while True:
            app.steps.put_nowait(None)
            if not await app.taken.get():
                break
        whole = b"".join(pieces)
        assert await _answer(reader) == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()
        await sender
        assert max(app.pieces) <= BODY_HIGH_WATER
    finally:
        writer.close()
        server.close()


async def test_a_keep_alive_connection_reads_the_next_request_after_a_large_body():
    """The last chunk of a body can leave reading paused; its end must resume it, or the
    next request on the connection is never read."""
    app = _Reader()
    server, _listener, port = await _serve(app)
    body = b"k" * (3 * BODY_HIGH_WATER)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(3):
            for _ in range(64):
                app.steps.put_nowait(None)  # read freely
            head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            writer.write(head + body)
            answer = await _answer(reader)
            assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
            while not app.steps.empty():
                app.steps.get_nowait()
    finally:
        writer.close()
        server.close()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(data), 65536):
        writer.write(view[start : start + 65536])
        await writer.drain()

"""A scripted HTTP/1.1 upstream on 127.0.0.1 for end-to-end tests.

Raw asyncio, so that a test can make it misbehave in exactly the ways real providers do:
answer slowly, reset before or after the head, close or stall mid-body, or never answer.
Every request it receives is recorded with its arrival time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # before the head
    # None | "reset-before-head" | "reset-after-head" | "close-mid-body" | "stall-body" | "hang"
    action: str | None = None
    chunked: bool = False
    chunk_delay: float = 0.0  # between body chunks (chunked only)
    chunks: int = 1
    raw: bytes | None = None  # written verbatim as the whole answer (bad framing, interims)
    close: bool = False  # close the connection after answering


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


Script = Callable[[Seen], Reply]


class ScriptedUpstream:
    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, idle_close: float | None = None
    ) -> None:
        self.idle_close = idle_close  # close connections idle this long (as Node.js does)
        self.closed_idle = 0  # connections closed for that
        self.replies: deque[Reply] = deque()
        self.default: Reply | Script = Reply()
        self.requests: list[Seen] = []
        self.ssl_context = ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0
        self.cancelled = 0  # requests whose client went away while the reply was pending

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = "localhost" if self.ssl_context else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def push(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                seen = await self._read_request(reader)
                if seen is None:
                    return
                self.requests.append(seen)
                if self.replies:
                    reply = self.replies.popleft()
                else:
                    reply = self.default(seen) if callable(self.default) else self.default
                keep = await self._answer(reply, seen, reader, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _read_request(self, reader: asyncio.StreamReader) -> Seen | None:
        try:
            if self.idle_close is None:
                head = await reader.readuntil(b"\r\n\r\n")
            else:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        except TimeoutError:
            self.closed_idle += 1
            return None
        at = time.monotonic()
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip(), v.strip()))
        lower = {k.lower(): v for k, v in headers}
        body = b""
        if "content-length" in lower:
            body = await reader.readexactly(int(lower["content-length"]))
        elif "chunked" in lower.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        return Seen(method, target, headers, body, at)

    async def _answer(
        self,
        reply: Reply,
        seen: Seen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if reply.action == "hang":
            await self._wait_or_gone(reader, 3600)
            return False
        if reply.delay:
            gone = await self._wait_or_gone(reader, reply.delay)
            if gone:
                return False
        if reply.action == "reset-before-head":
            writer.transport.abort()
            return False
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return not reply.close
        items = reply.headers.items() if isinstance(reply.headers, dict) else reply.headers
        headers = list(items)
        names = {k.lower() for k, _ in headers}
        body = reply.body
        if reply.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif "content-length" not in names:
            headers.append(("Content-Length", str(len(body))))
        head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(head.encode("latin-1") + b"\r\n")
        await writer.drain()
        if reply.action == "reset-after-head":
            writer.transport.abort()
            return False
        if seen.method == "HEAD" or reply.status in (204, 304):
            return True
        if reply.action in ("close-mid-body", "stall-body"):
            writer.write(_frame(body[: len(body) // 2], reply.chunked))
            await writer.drain()
            if reply.action == "stall-body":
                await self._wait_or_gone(reader, 3600)
            writer.transport.abort()
            return False
        if reply.chunked:
            n = max(1, reply.chunks)
            step = max(1, len(body) // n)
            for i in range(0, len(body), step):
                writer.write(_frame(body[i : i + step], True))
                await writer.drain()
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(body)
        await writer.drain()
        return not reply.close

    async def _wait_or_gone(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Sleep, but notice when the client closes the connection (it cancelled)."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return False
        if data == b"":
            self.cancelled += 1
            return True
        return False


def _frame(data: bytes, chunked: bool) -> bytes:
    if not chunked:
        return data
    if not data:
        return b""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"

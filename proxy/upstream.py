"""The only code that talks to upstreams.

`UpstreamClient.send` makes one attempt and returns the response once its head has arrived,
or raises `UpstreamFailure` classified as `connect-failure` (nothing was written: safe to
retry for any replayable body) or `reset`. It follows no redirects, keeps no cookies,
decodes no content codings and adds no headers beyond the request's own framing.

It is a small HTTP/1.1 client of its own: a keep-alive pool per upstream over aiohttp's
`ResponseHandler` protocol (its C response parser and flow control), with the request
written straight to the transport. aiohttp's `ClientSession` was the starting point; it
spent more CPU per request than the rest of the proxy together (see bench/README.md).
Timeouts are the caller's: the attempt stage bounds `send` by the attempt deadline;
`connect_timeout` bounds a new TCP+TLS connection (waiting for a pooled one is not a
failure: that wait is bounded by the attempt timeout).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import ClientConnectionError, ClientPayloadError, client_proto
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import Upstream

KEEPALIVE_IDLE = 15.0  # seconds an idle pooled connection is trusted (below common server limits)
READ_BUFSIZE = 2**16
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))  # get an explicit Content-Length: 0
_HEADLESS = b""


class UpstreamFailure(Exception):
    """One attempt failed before a response head arrived."""

    def __init__(self, kind: str, *, before_request: bool) -> None:
        super().__init__(kind)
        self.kind = kind  # "connect-failure" | "reset"
        self.before_request = before_request


Body = bytes | AsyncIterator[bytes] | None


def _ssl_context(upstream: Upstream) -> ssl.SSLContext | None:
    if upstream.scheme != "https":
        return None
    ctx = ssl.create_default_context(cafile=upstream.tls.ca_file)
    if not upstream.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Connection(client_proto.ResponseHandler):
    """One upstream connection; remembers when it went idle and how it parses."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.idle_since = 0.0
        self.parses_body: bool | None = None  # the mode its response parser was built for

    def prepare(self, with_body: bool) -> None:
        if self.parses_body is not with_body:
            # One parser serves every response on the connection while the mode is the same.
            self.set_response_params(
                skip_payload=not with_body,
                read_until_eof=True,
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
                max_line_size=16 * 1024,
                max_field_size=16 * 1024,
            )
            self.parses_body = with_body


class UpstreamResponse:
    """A response whose head has arrived; its body is `content`, read by the caller."""

    __slots__ = ("_client", "_conn", "content", "headers", "reason", "status")

    def __init__(
        self,
        client: UpstreamClient,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it can."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn, reusable=self.content.is_eof())

    def close(self) -> None:
        """Drop the response (and its connection) without reading the rest of the body."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn, reusable=False)


class UpstreamClient:
    """A keep-alive connection pool for one upstream, at most `max_connections` open."""

    def __init__(self, upstream: Upstream, clock: Clock = SYSTEM_CLOCK) -> None:
        self.upstream = upstream
        self.clock = clock
        self.in_flight = 0  # attempts waiting for a response head
        self.streaming = 0  # responses whose body is being relayed
        url = URL(upstream.url)
        self._host = url.raw_host or ""
        self._port = url.port or (443 if upstream.scheme == "https" else 80)
        self._ssl = _ssl_context(upstream)
        self._auth: str | None = None
        # URL userinfo is sent as Basic auth, unless an injected Authorization header wins.
        if upstream.userinfo and not any(n.lower() == "authorization" for n, _ in upstream.headers):
            user, password = upstream.userinfo
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    # -- pool ------------------------------------------------------------------------------
    async def _acquire(self) -> _Connection:
        idle = self._idle
        now = self.clock.now()
        while idle:
            conn = idle.pop()
            if (
                conn.is_connected()
                and not conn.should_close
                and now - conn.idle_since < KEEPALIVE_IDLE
            ):
                return conn
            self._discard(conn)
        while self._open >= self.upstream.max_connections:
            fut: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                handed = await fut
            except asyncio.CancelledError:
                handed = fut.result() if fut.done() and not fut.cancelled() else None
                if handed is not None:
                    self._release(handed, reusable=True)  # pass it on
                elif fut.done():
                    self._wake_one()  # we were told a slot freed up: pass that on
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
            if handed is not None:
                return handed
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.upstream.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UpstreamFailure("connect-failure", before_request=True) from exc
        return conn

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        if reusable and not self._closed and conn.is_connected() and not conn.should_close:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            conn.idle_since = self.clock.now()
            self._idle.append(conn)
            return
        self._discard(conn)
        self._wake_one()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _wake_one(self) -> None:
        """A connection slot freed up: let the oldest waiter open a new connection."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- one attempt -------------------------------------------------------------------------
    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: CIMultiDict[str],
        body: Body,
        length: int | None = None,
    ) -> UpstreamResponse:
        conn = await self._acquire()
        try:
            return await self._exchange(conn, method, path_and_query, headers, body, length)
        except BaseException:
            self._release(conn, reusable=False)
            raise

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        length: int | None,
    ) -> UpstreamResponse:
        transport = conn.transport
        if transport is None:
            raise UpstreamFailure("reset", before_request=True)
        conn.prepare(with_body=method != "HEAD")
        if self._auth is not None:
            headers["Authorization"] = self._auth
        stream: AsyncIterator[bytes] | None = None
        if body is None:
            if method in _BODY_METHODS:
                headers["Content-Length"] = "0"
            payload = _HEADLESS
        elif isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
            payload = body
        else:
            stream = body
            payload = _HEADLESS
            if length is not None:
                headers["Content-Length"] = str(length)
            else:
                headers["Transfer-Encoding"] = "chunked"
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        try:
            transport.write(head.encode("latin-1") + b"\r\n" + payload)
            if stream is not None:
                await self._write_stream(conn, stream, chunked=length is None)
            while True:
                message, content = await conn.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except (ClientConnectionError, ClientPayloadError, HttpProcessingError, OSError) as exc:
            raise UpstreamFailure("reset", before_request=False) from exc
        return UpstreamResponse(self, conn, message.code, message.reason, message.headers, content)

    async def _write_stream(
        self, conn: _Connection, stream: AsyncIterator[bytes], *, chunked: bool
    ) -> None:
        async for chunk in stream:
            transport = conn.transport
            if transport is None or transport.is_closing():
                raise ClientConnectionError("the upstream closed the connection")
            if not chunk:
                continue
            if chunked:
                transport.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                transport.write(chunk)
            if conn._paused:  # the upstream reads slower than the client sends
                await conn._drain_helper()
        if chunked and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_connections(self) -> int:
        return self._open

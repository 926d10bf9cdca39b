"""The only code that talks to upstreams.

`UpstreamClient.send` makes one attempt and returns the response once its head has arrived,
or raises `UpstreamFailure` classified as `connect-failure` (nothing was written: safe to
retry for any replayable body), `reset` (the connection broke, or the response head was
unparsable or badly framed), or `upstream-status` (a `101` to a request that did not ask to
upgrade). A failure while the body streams is `UpstreamBodyError`, raised by `readany`.
It follows no redirects, keeps no cookies, decodes no content codings and adds no headers
beyond the request's own framing (and Basic auth from URL userinfo).

It is a small HTTP/1.1 client of its own: a keep-alive pool per upstream of plain
`asyncio.Protocol` connections, each driven by httptools' (llhttp's) response parser in its
strict default mode. What llhttp cannot do is done here:

- A response to HEAD is finished at headers-complete (llhttp would wait for the body its
  Content-Length announces); the connection then gets a fresh parser.
- Interim responses: `100 Continue` is consumed, `103 Early Hints` goes to `on_interim`,
  any `101` is a failure (the proxy never forwards an upgrade).
- Bad framing (Content-Length with Transfer-Encoding, conflicting Content-Length, an
  unparsable head, a head over 64 KiB, a status outside 100-599) closes the connection,
  which is never reused.

Flow control is public asyncio API both ways: the transport stops reading while the
response body buffered here passes `BODY_HIGH_WATER` (the client reads slowly) and
resumes once the reader drained it; request body writes wait on `pause_writing` /
`resume_writing`.

Pooled connections are closed by a timer after `upstream.idle_timeout`, and at once when
the upstream closes them while idle. A failure on a *reused* connection before any byte
of the response arrived is the stale keep-alive race (the upstream closed it just as the
request went out), not an upstream failure: as Go's net/http Transport does, `send`
writes the request once more on a fresh connection when its body can be replayed and
either nothing was written yet, or the method is idempotent (GET, HEAD, OPTIONS, TRACE),
or it carries `Idempotency-Key` / `X-Idempotency-Key`. That resend is invisible to the
pipeline: no retry attempt, no budget, no breaker record.

Timeouts are the caller's: the attempt stage bounds `send` by the attempt deadline and the
handler bounds the gaps while the body streams; `connect_timeout` bounds a new TCP+TLS
connection (waiting for a pooled one is not a failure: the attempt timeout bounds it).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import inspect
import re
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import Upstream

BODY_HIGH_WATER = 256 * 1024  # bytes of response body buffered before reading pauses
MAX_HEAD_BYTES = 64 * 1024  # response head (interim responses included) larger → bad framing
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))  # get an explicit Content-Length: 0
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))  # resent after a stale race
_IDEMPOTENCY_HEADERS = ("Idempotency-Key", "X-Idempotency-Key")
_IDEMPOTENCY_NAMES = frozenset(name.lower() for name in _IDEMPOTENCY_HEADERS)
_FRAMING_FIELDS = frozenset(("content-length", "transfer-encoding"))
_FRAMING_FIELDS_AUTH = _FRAMING_FIELDS | {"authorization"}
_HEAD_END = b"\r\n\r\n"
_ERRNO = re.compile(r"\[Errno (\d+)\]")

Body = bytes | AsyncIterator[bytes] | None
# Request headers: a multidict, or (name, value) pairs in order, or header lines already
# serialised (bytes, CRLF-ended: what the proxy passes, with no framing field and no
# Authorization the URL's userinfo replaces). Never changed here.
RequestHeaders = CIMultiDict[str] | list[tuple[str, str]] | bytes
InterimHook = Callable[[int, list[tuple[str, str]]], Awaitable[None] | None]


class UpstreamFailure(Exception):
    """One attempt failed before a final response head arrived.

    `kind`: "connect-failure" | "reset" | "upstream-status". `before_request`: no byte of
    the request was written. `cause`: a short human reason for logs (`ECONNREFUSED`,
    `timeout after 2.00s`); never a URL, a query or a header value.
    """

    def __init__(self, kind: str, *, before_request: bool, cause: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.before_request = before_request
        self.cause = cause


class UpstreamBodyError(ConnectionError):
    """The response body broke off while streaming (connection lost, bad chunk framing)."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop llhttp: at the end of a HEAD response's head, or
    at a head the exchange cannot go on from (a 101, a bad status, a head too large)."""


def _ssl_context(upstream: Upstream) -> ssl.SSLContext | None:
    if upstream.scheme != "https":
        return None
    ctx = ssl.create_default_context(cafile=upstream.tls.ca_file)
    if not upstream.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect_cause(exc: BaseException, timeout: float) -> str:
    """A short, secret-free reason a connection could not be made."""
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:.2f}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.strerror or type(exc).__name__}"
    if isinstance(exc, OSError):
        return _os_error_cause(exc, "connect failed")
    return type(exc).__name__


def _os_error_cause(exc: OSError, fallback: str) -> str:
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror}"
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    # create_connection over several addresses: "Multiple exceptions: [Errno 111] ..."
    names = dict.fromkeys(
        errno.errorcode.get(int(n), n) for n in _ERRNO.findall(str(exc.args[0] if exc.args else ""))
    )
    return ", ".join(names) if names else fallback


def _lost_cause(exc: BaseException | None) -> str:
    if exc is None:
        return "connection closed before the response head"
    if isinstance(exc, ConnectionResetError):
        return "connection reset before the response head"
    if isinstance(exc, OSError):
        return "connection lost before the response head: " + _os_error_cause(exc, "error")
    return f"connection lost before the response head: {type(exc).__name__}"


class ResponseBody:
    """The response body as it arrives: a buffer, an end flag, and a waiter.

    `is_eof()` is true once the whole body arrived (bytes may still be buffered);
    `read_nowait()` takes what is buffered; `readany()` waits for more and returns b"" at
    the end. Taking from the buffer resumes a transport paused by `BODY_HIGH_WATER`.
    """

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: UpstreamBodyError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def is_eof(self) -> bool:
        return self._eof

    def read_nowait(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        conn = self._conn
        if conn.reading_paused:
            conn.resume()
        return data

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    # -- fed by the connection -------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, message: str) -> None:
        if not self._eof and self._error is None:
            self._error = UpstreamBodyError(message)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One upstream connection: the parser callbacks, one exchange at a time.

    Per exchange (`begin` … the body's end): interim heads are queued for `send`, the
    final head is kept, and the body is fed to a `ResponseBody`. Bytes that arrive while
    no exchange is running, or after the response ended, make the connection unusable.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: UpstreamClient) -> None:
        self.loop = loop
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = False
        self.keep_alive = True
        self.reused = False  # it served a response before this exchange
        self.pooled = False  # in the client's idle list
        self.discarded = False
        self.idle_since = 0.0  # loop time it went back to the pool
        self.reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # the current exchange
        self.active = False
        self.head_only = False
        self.got_bytes = False  # any response byte arrived for this exchange
        self.done = False  # the final response ended (body included)
        self.failure: UpstreamFailure | None = None
        # (status, reason, the head's fields as llhttp gave them, raw bytes)
        self.final: tuple[int, str, list[tuple[bytes, bytes]]] | None = None
        self.interims: list[tuple[int, list[tuple[str, str]]]] = []
        self.body: ResponseBody | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._raw: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_bytes = 0  # bytes received before the final head completed
        self._tail = b""  # the last bytes fed, to see where a HEAD response's head ended

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.alive = True

    def data_received(self, data: bytes) -> None:
        if not self.active or self.done:
            self._unexpected()
            return
        self.got_bytes = True
        if self.final is None:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _StopParsing):
                self._finished_head_only(data)
                return
            self._framing(exc)
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._framing(exc)  # (an upgrade is a 101, stopped at its head before this)
            return
        if self.final is None and self._head_bytes > MAX_HEAD_BYTES and self.failure is None:
            self._fail_head(f"bad response framing: head larger than {MAX_HEAD_BYTES} bytes")
        elif self.head_only:
            self._tail = (self._tail + data)[-3:]

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.transport = None
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self.pooled:
            self.client._lost_idle(self)
            return
        if not self.active:
            return
        if self.final is None:
            if self.failure is None:
                self.failure = UpstreamFailure(
                    "reset", before_request=False, cause=_lost_cause(exc)
                )
            self._wake()
            return
        body = self.body
        if body is not None and not body._eof:
            names = {name.lower() for name, _ in self.final[2]}
            if b"content-length" in names or b"transfer-encoding" in names:
                body._fail("the upstream connection broke off mid-body")
            else:
                self.keep_alive = False  # a body delimited by the connection's end
                self.done = True
                body._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._raw = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Once per field: only kept. The head's size is checked when it completes, and
        # after each read while it is incomplete (`data_received`), so one read (at most
        # uvloop's 256 KiB) bounds what a head can hold before it is refused.
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_bytes > MAX_HEAD_BYTES:
            # The reads so far could hold a head that is too large: measure this one.
            if sum([len(n) + len(v) for n, v in self._raw]) > MAX_HEAD_BYTES:
                self._fail_head(f"bad response framing: head larger than {MAX_HEAD_BYTES} bytes")
                raise _StopParsing
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self.failure = UpstreamFailure(
                    "upstream-status",
                    before_request=False,
                    cause="101 Switching Protocols to a request that did not ask to upgrade",
                )
                self.keep_alive = False
                self._wake()
                raise _StopParsing
            if status == 103:
                fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw]
                self.interims.append((status, fields))
                self._wake()
            elif status < 100:
                self._bad_status(status)
            return  # 100 Continue and other interim responses are consumed
        if status > 599 or parser.get_http_version()[:2] != "1.":
            self._bad_status(status)
            return
        # Kept as bytes: the client's head is built from them as they are, and the
        # `CIMultiDict` view is made only when a policy reads it (`UpstreamResponse.headers`).
        self.final = (status, self._reason.decode("latin-1"), self._raw)
        self.body = ResponseBody(self)
        self._wake()
        if self.head_only:
            raise _StopParsing

    def on_body(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            body._feed(data)

    def on_message_complete(self) -> None:
        if self.final is None:
            return  # an interim response ended; the final one follows
        self.done = True
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        assert self.body is not None
        self.body._finish()

    # -- exchange state ------------------------------------------------------------------------
    def begin(self, head_only: bool) -> None:
        self.active = True
        self.head_only = head_only
        self.got_bytes = False
        self.done = False
        self.failure = None
        self.final = None
        self.interims = []
        self.body = None
        self._head_bytes = 0
        self._tail = b""

    def end(self) -> None:
        """The exchange is over; the connection may go back to the pool."""
        self.active = False
        self.reused = True
        self.body = None
        self.final = None
        if self.reading_paused:
            self.resume()  # a pooled connection must notice the upstream closing it

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finished_head_only(self, data: bytes) -> None:
        """A HEAD (or 101) response stopped the parser at headers-complete."""
        version = self.parser.get_http_version()
        self.parser = httptools.HttpResponseParser(self)
        if self.failure is not None:  # a 101, or a bad status line
            self.close()
            return
        assert self.final is not None
        # llhttp's own keep-alive answer would count a HEAD response without a length as
        # delimited by the connection's end, so decide from the version and Connection.
        tokens = b",".join(v for n, v in self.final[2] if n.lower() == b"connection").lower()
        persistent = b"keep-alive" in tokens if version == "1.0" else b"close" not in tokens
        # Any byte after the head is a body llhttp could not skip: no reuse then.
        clean = (self._tail + data).endswith(_HEAD_END)
        self.keep_alive = self.keep_alive and persistent and clean
        self.done = True
        assert self.body is not None
        self.body._finish()

    def _framing(self, exc: Exception) -> None:
        what = str(exc) or type(exc).__name__
        self.keep_alive = False
        if self.final is None:
            self._fail_head(f"bad response framing: {what}")
        elif self.body is not None and not self.done:
            self.body._fail(f"bad response framing: {what}")
            self.close()
        else:
            self.close()  # garbage after a complete response

    def _bad_status(self, status: int) -> None:
        self._fail_head(f"bad response framing: status {status} or version not HTTP/1.x")
        raise _StopParsing

    def _fail_head(self, cause: str) -> None:
        if self.failure is None:
            self.failure = UpstreamFailure("reset", before_request=False, cause=cause)
        self.keep_alive = False
        self._wake()
        self.close()

    def _unexpected(self) -> None:
        """Bytes nobody asked for (between exchanges, or after a response ended)."""
        self.keep_alive = False
        if not self.active:
            self.close()
        # during an exchange that is done, the owner discards the connection on release

    # -- flow control --------------------------------------------------------------------------
    def pause(self) -> None:
        transport = self.transport
        if transport is not None and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()

    def resume(self) -> None:
        transport = self.transport
        self.reading_paused = False
        if transport is not None:
            transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self._write_paused and self.alive:
            drain = self._drain = self.loop.create_future()
            try:
                await drain
            finally:
                self._drain = None

    def close(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()


class UpstreamResponse:
    """A response whose head has arrived; its body is `content`, read by the caller.

    `raw` is the head's fields as received (bytes, in order); `headers` is a decoded
    (latin-1, so bytes round-trip) case-insensitive view, made on first use."""

    __slots__ = ("_client", "_conn", "_headers", "content", "raw", "reason", "status")

    def __init__(
        self,
        client: UpstreamClient,
        conn: _Connection,
        status: int,
        reason: str,
        raw: list[tuple[bytes, bytes]],
        content: ResponseBody,
    ) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.raw = raw
        self._headers: CIMultiDict[str] | None = None
        self.content = content

    @property
    def headers(self) -> CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw]
            )
        return headers

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
        self.stale_resends = 0  # requests sent again after a stale keep-alive race
        url = urlsplit(upstream.url)
        self._host = url.hostname or ""
        self._port = url.port or (443 if upstream.scheme == "https" else 80)
        self._ssl = _ssl_context(upstream)
        self._auth: str | None = None
        # URL userinfo is sent as Basic auth, unless an injected Authorization header wins.
        if upstream.userinfo and not any(n.lower() == "authorization" for n, _ in upstream.headers):
            user, password = upstream.userinfo
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        # Idle connections, least recently used first (each release appends, each acquire
        # takes the newest): the front is always the next to expire, so one timer per pool
        # (`_sweep`) serves them all and a request costs no timer of its own.
        self._idle: deque[_Connection] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    # -- pool ------------------------------------------------------------------------------
    async def _acquire(self) -> _Connection:
        conn = self._take_idle()
        if conn is not None:
            return conn
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
        """A new connection in a slot the caller already holds."""
        loop = asyncio.get_running_loop()
        timeout = self.upstream.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UpstreamFailure(
                "connect-failure", before_request=True, cause=connect_cause(exc, timeout)
            ) from exc
        return conn

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        conn.end()
        if reusable and not self._closed and conn.alive and conn.keep_alive:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            conn.pooled = True
            loop = conn.loop
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep = loop.call_at(
                    conn.idle_since + self.upstream.idle_timeout, self._expire, loop
                )
            return
        self._discard(conn)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the pooled connections idle for `idle_timeout`, then wait for the next."""
        self._sweep = None
        idle, timeout = self._idle, self.upstream.idle_timeout
        # A timer may fire up to the loop's clock resolution early: a little slack.
        cutoff = loop.time() - timeout + 0.005
        while idle and idle[0].idle_since <= cutoff:
            self._lost_idle(idle[0])
        if idle and not self._closed:
            self._sweep = loop.call_at(idle[0].idle_since + timeout, self._expire, loop)

    def _lost_idle(self, conn: _Connection) -> None:
        """A pooled connection timed out, or the upstream closed it, while idle."""
        if not conn.pooled:
            return
        conn.pooled = False
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        """Close a connection and free its slot (once), letting the oldest waiter have it."""
        if conn.discarded:
            return
        conn.discarded = True
        conn.close()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """A connection slot freed up: let the oldest waiter open a new connection."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take_idle(self) -> _Connection | None:
        """The most recently pooled connection that is still usable, if any (no await)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if conn.alive and conn.keep_alive:
                return conn
            self._discard(conn)
        return None

    # -- one attempt -------------------------------------------------------------------------
    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: RequestHeaders,
        body: Body,
        length: int | None = None,
        *,
        on_interim: InterimHook | None = None,
    ) -> UpstreamResponse:
        conn = self._take_idle()
        if conn is None:
            conn = await self._acquire()
        stream = _Stream(body) if body is not None and not isinstance(body, bytes) else None
        head = self._head(method, path_and_query, headers, body, length)
        payload = body if isinstance(body, bytes) else b""
        while True:
            written = False
            try:
                written = self._write(conn, head, payload)
                if stream is not None:
                    await self._write_stream(conn, stream, chunked=length is None)
                return await self._response(conn, on_interim)
            except UpstreamFailure as exc:
                if not self._stale_race(conn, exc, method, headers, stream, written):
                    self._release(conn, reusable=False)
                    raise
            except BaseException:
                self._release(conn, reusable=False)
                raise
            # The stale keep-alive race: again once, on a fresh connection in the same slot.
            self.stale_resends += 1
            conn.end()
            conn.discarded = True
            conn.abort()
            try:
                conn = await self._connect()
            except BaseException:
                self._open -= 1
                self._wake_one()
                raise

    def _stale_race(
        self,
        conn: _Connection,
        exc: UpstreamFailure,
        method: str,
        headers: RequestHeaders,
        stream: _Stream | None,
        written: bool,
    ) -> bool:
        """Go's rule: resend when the reused connection failed before any response byte, the
        body can be replayed, and nothing was written or the request is idempotent."""
        if exc.kind != "reset" or not conn.reused or conn.got_bytes:
            return False
        if stream is not None and stream.started:
            return False
        if not written:
            return True
        if method in _IDEMPOTENT:
            return True
        if isinstance(headers, bytes):
            lines = b"\r\n" + headers.lower()
            return any(b"\r\n" + name.encode() + b":" in lines for name in _IDEMPOTENCY_NAMES)
        if isinstance(headers, list):
            return any(n.lower() in _IDEMPOTENCY_NAMES for n, _ in headers)
        return any(name in headers for name in _IDEMPOTENCY_HEADERS)

    def _head(
        self,
        method: str,
        target: str,
        headers: RequestHeaders,
        body: Body,
        length: int | None,
    ) -> bytes:
        if body is None:
            framing = "Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else "\r\n"
        elif isinstance(body, bytes):
            framing = f"Content-Length: {len(body)}\r\n\r\n"
        elif length is not None:
            framing = f"Content-Length: {length}\r\n\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n\r\n"
        auth = self._auth
        if isinstance(headers, bytes):
            parts_b = [_encode_part(f"{method} {target} HTTP/1.1\r\n"), headers]
            if auth is not None:
                parts_b.append(f"Authorization: {auth}\r\n".encode("latin-1"))
            parts_b.append(framing.encode("latin-1"))
            return b"".join(parts_b)
        if isinstance(headers, CIMultiDict) or auth is not None:
            # Set here, from the body (and the URL's userinfo), whatever the caller passed.
            drop = _FRAMING_FIELDS if auth is None else _FRAMING_FIELDS_AUTH
            pairs: Iterable[tuple[str, str]] = (
                headers.items() if isinstance(headers, CIMultiDict) else headers
            )
            fields = [(n, v) for n, v in pairs if n.lower() not in drop]
        else:
            fields = headers
        parts = [method, " ", target, " HTTP/1.1\r\n"]
        for name, value in fields:
            parts += (name, ": ", value, "\r\n")
        if auth is not None:
            parts += ("Authorization: ", auth, "\r\n")
        parts.append(framing)
        text = "".join(parts)
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            # A value beyond latin-1 (from config) goes as its UTF-8 bytes; the rest stays
            # byte for byte as the client sent it.
            return b"".join(_encode_part(part) for part in parts)

    def _write(self, conn: _Connection, head: bytes, payload: bytes) -> bool:
        """Write the head (and a buffered body); False when nothing could be written."""
        transport = conn.transport
        conn.begin(head_only=head.startswith(b"HEAD "))
        if transport is None or transport.is_closing():
            raise UpstreamFailure(
                "reset", before_request=True, cause="connection closed before the request"
            )
        transport.write(head + payload if payload else head)
        return True

    async def _write_stream(self, conn: _Connection, stream: _Stream, *, chunked: bool) -> None:
        async for chunk in stream:
            if conn.final is not None or conn.failure is not None:
                conn.keep_alive = False  # answered (or failed) before the body was sent
                return
            transport = conn.transport
            if transport is None or transport.is_closing():
                raise UpstreamFailure(
                    "reset",
                    before_request=False,
                    cause="connection lost while sending the request body",
                )
            if not chunk:
                continue
            if chunked:
                # one writev, without copying the chunk into its framing
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            del chunk  # the transport holds it until written; the loop need not
            await conn.drain()  # the upstream reads slower than the client sends
        transport = conn.transport
        if chunked and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")

    async def _response(
        self, conn: _Connection, on_interim: InterimHook | None
    ) -> UpstreamResponse:
        while True:
            if conn.interims:
                interims, conn.interims = conn.interims, []
                if on_interim is not None:
                    for status, fields in interims:
                        done = on_interim(status, fields)
                        if inspect.isawaitable(done):
                            await done
            if conn.failure is not None:
                raise conn.failure
            final = conn.final
            if final is not None:
                assert conn.body is not None
                return UpstreamResponse(self, conn, final[0], final[1], final[2], conn.body)
            waiter = conn.waiter = conn.loop.create_future()
            try:
                await waiter
            finally:
                conn.waiter = None

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._idle):
            self._lost_idle(conn)
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


class _Stream:
    """A request body stream that remembers whether a chunk was taken from it."""

    __slots__ = ("_it", "started")

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self._it = body
        self.started = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        return await self._it.__anext__()


def _encode_part(part: str) -> bytes:
    try:
        return part.encode("latin-1")
    except UnicodeEncodeError:
        return part.encode("utf-8")


__all__ = [
    "Body",
    "InterimHook",
    "ResponseBody",
    "UpstreamBodyError",
    "UpstreamClient",
    "UpstreamFailure",
    "UpstreamResponse",
    "connect_cause",
]

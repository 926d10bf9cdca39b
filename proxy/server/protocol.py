"""The proxy listener's HTTP/1.1 connection protocol: an `asyncio.Protocol` driven by
httptools' request parser (llhttp, strict mode).

What one connection guarantees:

- **Strict framing** (DESIGN §5). llhttp refuses CL+TE, duplicate, signed, hex and
  list-valued Content-Length, bare LF, bare CR, obs-fold, control bytes in a value and
  whitespace before the colon. Checked here on top: the HTTP version (0.9 → 400, a major
  other than 1 → 505, 1.2+ served as 1.1), a `#fragment` or a target not in origin-form,
  CONNECT, a missing or repeated Host, HTTP/1.0 with Transfer-Encoding, a
  final coding other than `chunked` (400) or another coding before it (501), `_` in a field
  name (`headers_with_underscores`). Such a request is answered with the proxy's JSON error
  and the connection closes; the handler never sees it, so no upstream sees a byte.
  Field names and values are decoded as latin-1, so obs-text bytes round-trip unchanged.
- **Client limits**: a head that has begun must complete within `client_header_timeout`
  (408); a head over `max_header_bytes` gets 431; a body over `max_request_body` makes the
  body stream fail with `BodyTooLarge` (413); a gap between body chunks longer than
  `client_body_timeout` fails it with `ClientBodyTimeout` (408); an idle keep-alive
  connection is closed after `client_idle_timeout`.
- **Order**: requests are handled one at a time, answers leave in request order.
  Pipelined requests are queued (reading pauses while one waits).
- **Flow control**: a request body is buffered up to `BODY_HIGH_WATER`, then reading pauses
  until the handler (and so the upstream) has consumed it and asks for more: reading
  resumes only while a reader waits, so a connection holds about one read's worth of body
  (uvloop reads up to 256,000 bytes at a time), never one chunk being written upstream
  plus the next. Writes respect the transport's
  write-buffer limits: `Response.write` waits for `resume_writing` once the buffer passes
  `WRITE_HIGH_WATER`, so a slow reader never makes the proxy buffer without bound.
- **Disconnects**: when the client goes away, the running request's task is cancelled at
  once (and with it the upstream attempt); queued requests are dropped.
- **Framing of answers**: Content-Length when known; else chunked to HTTP/1.1 clients and
  close-delimited to HTTP/1.0 clients (never chunked). HEAD, 204 and 304 answers carry no
  body. `Connection: close` from the client, an HTTP/1.0 client without keep-alive, a body
  left unread, or an error answer close the connection after the answer.

State machines, each in one place:

- a request, as it arrives (`HttpConnection`'s parser callbacks): idle → head
  (`on_message_begin`; `_in_head`, the head timer runs if it spans reads) → checked and
  queued (`on_headers_complete`) → body (`on_body` into its `BodyStream`) → complete
  (`on_message_complete`); a refusal at any point (`_refuse`) queues an error answer and
  stops parsing;
- a connection's queue (`_enqueue`, `_start`, `_finished`): the first request is handled,
  the rest wait; after each answer the connection closes, starts the next, or goes idle;
- an answer (`Request`): nothing sent → interim heads (100, 103) → head sent (`start`) →
  body (`write`) → done (`end`); or nothing sent → done in one write (`send_whole`);
  `abort` cuts the connection from any state.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict

from proxy.config.model import Limits
from proxy.errors import BadRequestBody, BodyTooLarge, ClientBodyTimeout, ProxyError, error_body
from proxy.headers import HOP_BY_HOP, VIA_VALUE
from proxy.observe import log

BODY_HIGH_WATER = 64 * 1024  # buffered request body bytes at which reading pauses
WRITE_HIGH_WATER = 64 * 1024  # transport write buffer before writers wait
LINGER = 2.0  # seconds a closing connection keeps dropping what the client still sends
PEER_WATCH_INTERVAL = 0.5  # seconds between checks that a paused client is still there

_BODILESS = frozenset((204, 304))
_PAUSE_BODY = 1
_PAUSE_PIPELINE = 2

_REASONS = {
    100: "Continue",
    103: "Early Hints",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    508: "Loop Detected",
}
_STATUS_LINES: dict[tuple[int, str], bytes] = {}


def status_line(status: int, reason: str) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, cached; the upstream's reason phrase is relayed. Always
    HTTP/1.1, also to HTTP/1.0 clients (RFC 9110 §2.5: the highest version we conform to)."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = f"HTTP/1.1 {status} {reason or _REASONS.get(status, '')}\r\n".encode(
            "latin-1", "replace"
        )
        if len(_STATUS_LINES) < 4096:
            _STATUS_LINES[key] = line
    return line


def encode_head(text: str) -> bytes:
    """Header lines as bytes: latin-1 (what came from a peer round-trips byte for byte);
    text that is not latin-1 (a configured static header) is sent as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        # surrogateescape: what a UTF-8-decoding peer library kept as surrogates goes out
        # as the bytes it came in as.
        return text.encode("utf-8", "surrogateescape")


class Application(Protocol):
    """What a connection needs from the proxy: the current limits and the handler."""

    def limits(self) -> Limits: ...

    def underscores(self) -> str: ...  # headers_with_underscores: reject | drop | allow

    async def handle(self, request: Request) -> None: ...

    def refuse(self, request: Request, error: ProxyError) -> None: ...


class _Refused(Exception):
    """Raised from a parser callback: the request is answered with `error`, then closed."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


class BodyStream:
    """The request body as it arrives: `readany()` returns what is buffered (b"" at the
    end), waiting at most `gap` seconds for more; it raises `ClientBodyTimeout` after a
    longer gap and `BodyTooLarge` once more than the limit arrived.

    Flow control is pulled by the reader: reading pauses once `BODY_HIGH_WATER` bytes are
    buffered and resumes only when `readany` finds the buffer empty and waits. Taking a
    chunk does not resume it, so while the reader writes that chunk upstream (and waits
    for the upstream to drain it) the next one stays in the kernel's socket buffer instead
    of in ours: one upload holds about one read of body in memory, not two."""

    __slots__ = (
        "_conn",
        "_error",
        "_gap",
        "_limit",
        "_parts",
        "_size",
        "_waiter",
        "eof",
        "received",
    )

    def __init__(self, conn: HttpConnection, limit: int, gap: float | None) -> None:
        self._conn = conn
        self._limit = limit
        self._gap = gap
        self._parts: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.eof = False
        self.received = 0

    # -- producer side (the connection) -------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return  # refused already: the rest is dropped, the connection will close
        self.received += len(data)
        if self.received > self._limit:
            self.fail(BodyTooLarge())
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size >= BODY_HIGH_WATER:
            self._conn._pause(_PAUSE_BODY)
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._conn._resume(_PAUSE_BODY)  # no body bytes are left to hold back
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
            self._parts.clear()
            self._size = 0
            self._conn._resume(_PAUSE_BODY)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- consumer side (the handler, the upstream client) -------------------------------
    def is_eof(self) -> bool:
        return self.eof and not self._parts

    async def readany(self) -> bytes:
        while True:
            if self._error is not None:
                raise self._error
            if self._parts:
                return self._take()
            if self.eof:
                return b""
            self._conn._resume(_PAUSE_BODY)  # the reader wants more: read again
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self._gap is None:
                await waiter
                continue
            timer = asyncio.get_running_loop().call_later(self._gap, self._timed_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()

    def _take(self) -> bytes:
        """The buffered parts, joined while they fit `BODY_HIGH_WATER` (many small chunks of
        a chunked body become one write); a part larger than that goes alone, uncopied."""
        parts = self._parts
        first = parts[0]
        if len(parts) == 1 or len(first) + len(parts[1]) > BODY_HIGH_WATER:
            del parts[0]
            self._size -= len(first)
            return first
        count, size = 0, 0
        for part in parts:
            if size + len(part) > BODY_HIGH_WATER:
                break
            size += len(part)
            count += 1
        data = b"".join(parts[:count])
        del parts[:count]
        self._size -= size
        return data

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self.fail(ClientBodyTimeout())


class Request:
    """One request on a connection and its answer (the response state machine).

    Answer states: nothing sent → (interim heads) → head sent → done. `send_whole` goes
    from nothing to done in one write; `start` sends the head, `write` the body, `end`
    finishes it."""

    __slots__ = (
        "_chunked_out",
        "_closing",
        "_conn",
        "body",
        "bytes_out",
        "chunked",
        "complete",
        "content_length",
        "done",
        "error",
        "expect_continue",
        "head_sent",
        "headers",
        "host",
        "keep_alive",
        "limits",
        "method",
        "raw_headers",
        "started",
        "target",
        "version",
    )

    def __init__(self, conn: HttpConnection, limits: Limits) -> None:
        self._conn = conn
        self.limits = limits
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.headers: CIMultiDict[str] = CIMultiDict()
        # The same fields as received (bytes, in order): what is forwarded, byte for byte.
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        self.keep_alive = False
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body: BodyStream | None = None  # None: the request has no body
        self.complete = False  # the whole request (body included) has arrived
        self.error: ProxyError | None = None  # refused by the connection: answer this
        self.started = False
        self.head_sent = False
        self.done = False
        self.bytes_out = 0
        self._chunked_out = False
        self._closing = False

    # -- what the handler reads ---------------------------------------------------------
    @property
    def remote(self) -> str | None:
        return self._conn.peer

    @property
    def scheme(self) -> str:
        return "http"

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task answering this request, while the handler runs (requests on a
        connection are answered one at a time)."""
        return self._conn._task

    @property
    def http10(self) -> bool:
        return self.version == "1.0"

    # -- the answer ---------------------------------------------------------------------
    def close_after(self) -> None:
        """Close the connection once this answer is sent."""
        self._closing = True

    def send_continue(self) -> None:
        """`100 Continue`, when the client asked for it and nothing was sent yet."""
        if self.expect_continue and not self.head_sent and not self.complete and not self.http10:
            self.expect_continue = False
            self._conn._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def send_interim(self, status: int, lines: str) -> None:
        """An informational head (103 Early Hints) to an HTTP/1.1 client; never to 1.0."""
        if self.head_sent or self.done or self.http10:
            return
        self._conn._write(status_line(status, "") + encode_head(lines) + b"\r\n")

    def relay_interim(self, status: int, headers: list[tuple[str, str]]) -> None:
        """An upstream's interim answer: 103 Early Hints goes on, hop-by-hop fields removed;
        other 1xx are consumed. Not a response byte for retry, failover or fallback."""
        if status != 103:
            return
        lines = "".join(f"{n}: {v}\r\n" for n, v in headers if n.lower() not in HOP_BY_HOP)
        self.send_interim(103, lines)

    def _framing(self, length: str | None, has_body: bool) -> bytes:
        """Content-Length / chunked / close-delimited, and the Connection header."""
        conn = self._conn
        keep = self.keep_alive and not self._closing and not conn.closing and not conn.draining
        if has_body and length is None:
            if self.http10:
                keep = False  # close-delimited: HTTP/1.0 never gets chunked
                framing = b""
            else:
                self._chunked_out = True
                framing = b"Transfer-Encoding: chunked\r\n"
        elif length is not None:
            framing = b"Content-Length: " + length.encode("latin-1") + b"\r\n"
        else:
            framing = b""
        if not keep:
            self._closing = True
            return framing + b"Connection: close\r\n\r\n"
        if self.http10:
            return framing + b"Connection: keep-alive\r\n\r\n"
        return framing + b"\r\n"

    def send_whole(
        self,
        status: int,
        reason: str,
        lines: bytes,
        body: bytes,
        *,
        bodiless: bool = False,
        head_length: str | None = None,
    ) -> None:
        """The whole answer in one write. `lines` are the header lines (bytes, CRLF-ended)
        without framing; `bodiless` sends no body and no length. To a HEAD the length
        declared is `head_length` (what the GET would carry), else len(body)."""
        assert not self.head_sent
        self.head_sent = True
        self.done = True
        if bodiless or status in _BODILESS or self.method == "HEAD":
            # HEAD: the length a GET would get; 204 and 304: no body at all.
            length = None
            if not bodiless and status != 204:
                length = head_length if head_length is not None else str(len(body))
            head = status_line(status, reason) + lines + self._framing(length, False)
            self._conn._write(head)
            self.bytes_out += len(head)
            return
        data = b"".join(
            (
                status_line(status, reason),
                lines,
                self._framing(str(len(body)), True),
                body,
            )
        )
        self.bytes_out += len(data)
        self._conn._write(data)

    def start(
        self, status: int, reason: str, lines: bytes, length: str | None, *, bodiless: bool = False
    ) -> None:
        """Send the head of a streamed answer. `length`: the Content-Length to declare
        (None: unknown, so chunked or close-delimited; on a bodiless answer it is passed
        through as is, as HEAD and 304 answers do)."""
        assert not self.head_sent
        self.head_sent = True
        if bodiless:
            framing = self._framing(length, False)
            self.done = True
        else:
            framing = self._framing(length, True)
        head = status_line(status, reason) + lines + framing
        self.bytes_out += len(head)
        self._conn._write(head)

    async def write(self, chunk: bytes) -> None:
        """A piece of the body; waits while the client reads slower than we write."""
        if not chunk or self.done:
            return
        self.bytes_out += len(chunk)
        conn = self._conn
        if self._chunked_out:
            conn._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            conn._write(chunk)
        if conn.write_paused:
            await conn.drain()

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        if self._chunked_out:
            self._conn._write(b"0\r\n\r\n")

    def abort(self) -> None:
        """The answer cannot be completed honestly: cut the connection."""
        self.done = True
        self._closing = True
        self._conn.abort()


class HttpConnection(asyncio.Protocol):
    """One client connection (see the module docstring for what it guarantees)."""

    def __init__(self, app: Application, on_close: Callable[[HttpConnection], None]) -> None:
        self._app = app
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)  # we check it: 505, 1.2
        self.peer: str | None = None
        self.closing = False
        self.draining = False  # shutting down: answers say Connection: close
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = 0  # _PAUSE_* bits
        self._dead = False  # the parser refused the stream: no more input is parsed
        # The request being parsed (None between requests).
        self._parsing: Request | None = None
        self._in_head = False
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._max_head = 0  # max_header_bytes of the request being parsed
        self._raw_head = 0  # bytes of earlier reads that the head being parsed spans
        self._chunk = 0  # bytes of the read being parsed
        # Requests whose head arrived, oldest first; the first is the one being handled.
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._limits = app.limits()

    # -- transport events -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self._went_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self._transport = None
        for timer in (self._head_timer, self._idle_timer, self._watch, self._linger):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._watch = self._linger = None
        for req in self._queue:
            if req.body is not None:
                req.body.fail(ConnectionResetError("the client closed the connection"))
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(ConnectionResetError("the client closed the connection"))
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client went away: so does its upstream attempt
        self._queue.clear()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._on_close(self)

    def eof_received(self) -> bool | None:
        return None  # the client is gone (or done lingering): close, cancel what it asked

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if not self.write_paused or self._transport is None:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close once what was written has been sent.

        A lingering close, as nginx does: our side is shut first (the client reads the
        answer, then EOF), and what the client still sends (the rest of an upload we
        refused) is read and dropped for up to LINGER seconds, because closing a socket with
        unread input resets the connection, and a reset can destroy the answer before the
        client read it."""
        transport = self._transport
        if self.closing or transport is None:
            self.closing = True
            return
        self.closing = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._paused = 0
        transport.resume_reading()
        self._linger = self._loop.call_later(LINGER, transport.close)

    @property
    def idle(self) -> bool:
        return not self._queue and self._parsing is None

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
            if self._watch is None:
                self._watch = self._loop.call_later(PEER_WATCH_INTERVAL, self._watch_peer)
        self._paused |= reason

    def _watch_peer(self) -> None:
        """While reading is paused the loop cannot see the client leave: peek at the socket
        now and then, so that a client that went away still cancels its request."""
        self._watch = None
        transport = self._transport
        if not self._paused or transport is None:
            return
        if _peer_gone(transport):
            transport.abort()  # connection_lost follows: the request's task is cancelled
            return
        self._watch = self._loop.call_later(PEER_WATCH_INTERVAL, self._watch_peer)

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._transport is not None and not self.closing:
                self._transport.resume_reading()

    # -- input ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._dead or self.closing:
            return
        self._idle_since = -1.0  # busy (the idle timer checks this)
        self._chunk = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[int(exc.args[0]) :] if exc.args else b"")
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.error)
            else:
                self._refuse(ProxyError.bad_request("the request could not be parsed"))
            return
        except httptools.HttpParserError:
            self._refuse(ProxyError.bad_request("the request could not be parsed"))
            return
        if self._in_head:
            # Part of a head arrived but not all of it: from now on it has a deadline (a
            # head that arrives whole, the common case, never arms a timer).
            self._raw_head += len(data)
            if self._raw_head > self._max_head and (
                self._raw_head > 2 * self._max_head + 65536 or self._head_size() > self._max_head
            ):
                self._refuse(ProxyError.head_too_large(self._limits.max_header_bytes))
                return
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(
                    self._limits.client_header_timeout, self._head_timed_out
                )
        elif self.idle and self._task is None:
            self._went_idle()

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stops at an Upgrade (or CONNECT) request, whose head was dispatched."""
        req = self._queue[-1] if self._queue else None
        upgrade = req.headers.get("Upgrade", "").strip().lower() if req is not None else ""
        if req is None or req.method == "CONNECT" or upgrade != "h2c":
            self._dead = True  # the handler refuses it (501) and closes
            return
        if req.body is not None:
            # llhttp skipped the body of the upgrade request: it cannot be framed any more.
            req.error = ProxyError(
                501, "upgrade", "an h2c upgrade offer with a request body is not supported"
            )
            self._dead = True
            return
        # An h2c offer may be ignored (RFC 9110 §7.8): carry on as HTTP/1.1.
        self._parser = httptools.HttpRequestParser(self)
        self._parser.set_dangerous_leniencies(lenient_version=True)
        if rest:
            self.data_received(rest)

    def _refuse(self, error: ProxyError) -> None:
        """Answer `error` in turn (after the requests before it) and stop reading."""
        self._dead = True
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parsing = self._parsing
        self._parsing = None
        if parsing is not None and parsing in self._queue:
            if not parsing.started:
                parsing.error = error  # its head was accepted, its framing then failed
            elif parsing.body is not None:
                parsing.body.fail(BadRequestBody(error.message))
            return
        req = Request(self, self._limits)
        req.error = error
        self._enqueue(req)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._paused and self._in_head and not self.closing:
            # We stopped reading (an earlier request is still being answered): the rest of
            # this head may be waiting in the socket. Its clock restarts when we read again.
            self._head_timer = self._loop.call_later(
                self._limits.client_header_timeout, self._head_timed_out
            )
            return
        if self._in_head and not self.closing:
            self._refuse(ProxyError(408, "client-timeout", "the request head arrived too slowly"))

    def _went_idle(self) -> None:
        """Nothing to do on this connection: it closes after client_idle_timeout."""
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(
                self._limits.client_idle_timeout, self._idle_check
            )

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.closing:
            return
        since = self._idle_since
        timeout = self._limits.client_idle_timeout
        if since < 0 or not self.idle or self._task is not None:
            return  # busy: re-armed when it goes idle again
        left = since + timeout - self._loop.time()
        if left <= 0:
            self.close()
        else:
            self._idle_timer = self._loop.call_later(left, self._idle_check)

    # -- parser callbacks: the request state machine ------------------------------------
    def on_message_begin(self) -> None:
        limits = self._limits = self._app.limits()
        self._max_head = limits.max_header_bytes
        self._parsing = Request(self, limits)
        self._in_head = True
        self._url = b""
        self._raw_headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) + 16 > self._max_head:
            raise _Refused(ProxyError.head_too_large(self._max_head))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field: only kept. The size limit is checked for the whole head
        # when it completes, and after each read while it is incomplete; what the fields
        # say, in on_headers_complete.
        if self._in_head:  # else a trailer field: dropped (Trailer is hop-by-hop)
            self._raw_headers.append((name, value))

    def _head_size(self) -> int:
        """The head's size so far as max_header_bytes counts it: the target plus 16 for the
        request line, each field plus 4 (": " and CRLF)."""
        return len(self._url) + 16 + sum([len(n) + len(v) + 4 for n, v in self._raw_headers])

    def _headers(self) -> CIMultiDict[str]:
        """The head's fields as text: latin-1 (obs-text round-trips byte for byte), trailing
        whitespace removed, names with "_" handled per `headers_with_underscores`."""
        fields = [
            (n.decode("latin-1"), v.rstrip(b" \t").decode("latin-1")) for n, v in self._raw_headers
        ]
        headers: CIMultiDict[str] = CIMultiDict(fields)
        if "_" in "".join(headers.keys()):  # one pass in C over the names
            policy = self._app.underscores()
            if policy == "reject":
                raise _Refused(ProxyError.bad_request("a header field name contains an underscore"))
            if policy == "drop":
                headers = CIMultiDict([(n, v) for n, v in fields if "_" not in n])
                self._raw_headers = [(n, v) for n, v in self._raw_headers if b"_" not in n]
        return headers

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._in_head = False
        if self._raw_head + self._chunk > self._max_head and self._head_size() > self._max_head:
            raise _Refused(ProxyError.head_too_large(self._max_head))  # (the reads could hold it)
        self._raw_head = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self._parser
        version = parser.get_http_version()
        if version[0] != "1":
            if version[0] == "0":
                raise _Refused(ProxyError.bad_request("HTTP/0.9 requests are not supported"))
            raise _Refused(
                ProxyError(
                    505, "unsupported-version", f"HTTP/{version} is not supported; use HTTP/1.1"
                )
            )
        req.version = "1.0" if version == "1.0" else "1.1"
        method = req.method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise _Refused(
                ProxyError.bad_request("CONNECT is not supported: this is not a forward proxy")
            )
        target = self._url.decode("latin-1")
        if "#" in target:
            raise _Refused(ProxyError.bad_request("the request target contains a fragment"))
        if not target.startswith("/"):
            raise _Refused(ProxyError.bad_request("only origin-form request targets are accepted"))
        req.target = target
        headers = req.headers = self._headers()
        req.raw_headers = self._raw_headers
        hosts = headers.getall("Host", ())
        if len(hosts) > 1:
            raise _Refused(ProxyError.bad_request("the request has more than one Host header"))
        if not hosts:
            raise _Refused(ProxyError.bad_request("the request has no Host header"))
        req.host = hosts[0]
        codings = headers.getall("Transfer-Encoding", ())
        if codings:
            if req.version == "1.0":
                raise _Refused(ProxyError.bad_request("Transfer-Encoding in an HTTP/1.0 request"))
            tokens = [t.strip().lower() for v in codings for t in v.split(",")]
            if tokens[-1] != "chunked" or tokens.count("chunked") != 1:
                raise _Refused(
                    ProxyError.bad_request("the final transfer coding must be chunked, once")
                )
            if len(tokens) > 1:
                raise _Refused(
                    ProxyError(501, "unsupported-coding", "transfer codings other than chunked")
                )
            req.chunked = True
        else:
            length = headers.get("Content-Length")
            if length is not None:
                req.content_length = int(length)  # llhttp accepted only digits
        req.keep_alive = parser.should_keep_alive()
        if req.chunked or req.content_length:
            limits = self._limits
            req.body = BodyStream(self, limits.max_request_body, limits.client_body_timeout)
            expect = headers.get("Expect")
            if expect is not None and expect.lower() == "100-continue":
                req.expect_continue = True
        self._enqueue(req)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is None:
            return
        req.complete = True
        if req.body is not None:
            req.body.feed_eof()

    # -- dispatch -----------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self._queue.append(req)
        if len(self._queue) == 1:
            self._start(req)
        else:
            self._pause(_PAUSE_PIPELINE)  # answered in order; stop reading meanwhile

    def _start(self, req: Request) -> None:
        req.started = True
        self._idle_since = -1.0
        self._task = self._loop.create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        try:
            if req.error is not None:
                req.close_after()
                self._app.refuse(req, req.error)
            else:
                await self._app.handle(req)
        except asyncio.CancelledError:
            return  # the client went away
        except Exception as exc:  # noqa: BLE001 - a bug must cost one answer, not the process
            log.error("request_failed", error=f"{type(exc).__name__}: {exc}")
            if not req.head_sent and not self.closing:
                error = ProxyError(500, "internal", "the proxy failed to handle the request")
                req.close_after()
                self._app.refuse(req, error)
            else:
                req.abort()
        finally:
            self._task = None
            self._finished(req)

    def _finished(self, req: Request) -> None:
        if self._queue and self._queue[0] is req:
            self._queue.popleft()
        if not req.done:
            req.abort()  # the handler left the answer incomplete
        if req._closing or not req.complete or self.closing or self.draining:
            self.close()
            return
        if self._queue:
            if len(self._queue) == 1:
                self._resume(_PAUSE_PIPELINE)
            self._start(self._queue[0])
        else:
            self._resume(_PAUSE_PIPELINE)
            if self._parsing is None:
                self._went_idle()


def error_head(status: int, reason: str, route: str, message: str) -> tuple[bytes, bytes]:
    """(header lines, body) of one of the proxy's own JSON errors."""
    body = error_body(reason, route, message)
    lines = f"Content-Type: application/json\r\nVia: {VIA_VALUE}\r\n".encode()
    return lines, body


_TCP_CLOSE_WAIT, _TCP_CLOSE = 8, 7  # linux/include/net/tcp_states.h


def _peer_gone(transport: asyncio.Transport) -> bool:
    """True when the client closed or reset the connection, seen in the socket's TCP state
    (the FIN sits behind request bytes that `pause_reading` left unread). As on an EOF
    while reading, a client that closed its side is taken as gone."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return True
    return bool(info) and info[0] in (_TCP_CLOSE_WAIT, _TCP_CLOSE)


class ProxyListener:
    """Builds a connection per client and knows them all, for a graceful shutdown."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.connections: set[HttpConnection] = set()

    def __call__(self) -> HttpConnection:
        conn = HttpConnection(self.app, self.connections.discard)
        self.connections.add(conn)
        return conn

    async def shutdown(self, timeout: float, sleep: Callable[[float], Awaitable[None]]) -> None:
        """Close idle connections now, busy ones once their answer is sent (or at timeout)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for conn in self.connections:
            conn.draining = True
        while True:
            for conn in list(self.connections):
                if conn.idle and conn._task is None:
                    conn.close()
            if not self.connections or loop.time() >= end:
                break
            await sleep(min(0.05, max(0.0, end - loop.time())))
        self.abort_all()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

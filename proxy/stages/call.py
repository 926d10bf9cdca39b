"""What flows through a route's pipeline: one `Call` in, one `Result` out.

Stages return outcomes instead of raising (Polly's `Outcome`): a `Result` holds either an
upstream response whose head has arrived, a failure condition, or a fallback to send.
Cancellation (the client went away) is the one thing that propagates as an exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from proxy.errors import ProxyError
from proxy.observe.metrics import RequestRecord

if TYPE_CHECKING:
    from proxy.cache import EntryWriter, StaleHit
    from proxy.config.model import StaticFallback
    from proxy.resilience.classify import Attempt
    from proxy.server.forwarding import HeaderPlan, OutgoingHeaders
    from proxy.upstream import UpstreamResponse


class ByteSource(Protocol):
    """The client's body as the listener delivers it: `readany()` is the next chunk (b"" at
    the end); it enforces the client limits itself (gap timeout, size) by raising."""

    async def readany(self) -> bytes: ...


class RequestBody:
    """The client's request body, buffered when it can be replayed, else streamed once.

    `replayable` holds while the whole body is in memory (small bodies, read before the
    first attempt) or while nothing of the stream has been read yet.
    """

    __slots__ = ("_stream", "buffered", "client_error", "consumed", "length", "prefix")

    def __init__(
        self,
        buffered: bytes | None,
        stream: ByteSource | None = None,
        prefix: bytes = b"",
        length: int | None = None,
    ) -> None:
        self.buffered = buffered
        self._stream = stream
        self.prefix = prefix
        self.consumed = False
        self.length = length
        # Set when reading the client's body failed while streaming it upstream (too slow,
        # too large): the request is then the client's fault, not the upstream's.
        self.client_error: Exception | None = None

    @property
    def stream_length(self) -> int | None:
        """The declared length of a streamed body (None: unknown, or buffered)."""
        return self.length if self.buffered is None and not self.prefix else None

    @property
    def replayable(self) -> bool:
        return self.buffered is not None or not self.consumed

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.buffered is not None:
            return self.buffered if self.buffered else None
        if self._stream is None:
            return None
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self.consumed = True
        if self.prefix:
            yield self.prefix
        assert self._stream is not None
        while True:
            try:
                chunk = await self._stream.readany()
            except Exception as exc:
                self.client_error = exc
                raise
            if not chunk:
                return
            yield chunk
            del chunk  # not kept alive while the next one is awaited


async def prepare_body(
    stream: ByteSource,
    *,
    content_length: int | None,
    max_body: int,
    replay_limit: int,
) -> RequestBody:
    """Buffer the body when it fits `replay_limit` (so it can be replayed), else stream it.

    A body of unknown length is read up to `replay_limit`; if it goes on, what was read is
    sent first and the rest streams (not replayable). The stream enforces `max_body` and
    the gap timeout while it is read; a declared length over `max_body` is refused here.
    """
    if content_length is not None and content_length > max_body:
        raise ProxyError.body_too_large(max_body)
    if content_length is not None and content_length > replay_limit:
        return RequestBody(None, stream, length=content_length)
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.readany()
        if not chunk:
            return RequestBody(b"".join(parts), length=size)
        size += len(chunk)
        if size > max_body:
            raise ProxyError.body_too_large(max_body)
        parts.append(chunk)
        if size > replay_limit:
            return RequestBody(None, stream, prefix=b"".join(parts))


EMPTY_BODY = RequestBody(b"")


class Call:
    """One client request as the pipeline sees it."""

    __slots__ = (
        "_headers",
        "_make_headers",
        "body",
        "deadline",
        "for_target",
        "has_idempotency_key",
        "hop",
        "method",
        "on_interim",
        "path_qs",
        "record",
        "request_headers",
        "task",
    )

    def __init__(
        self,
        method: str,
        path_qs: str,
        make_headers: Callable[[], OutgoingHeaders],
        request_headers: Any,
        body: RequestBody,
        record: RequestRecord,
        deadline: float | None,
    ) -> None:
        self.method = method
        self.path_qs = path_qs  # the primary upstream's path and query, raw
        self._make_headers = make_headers  # the primary upstream's request headers
        self._headers: OutgoingHeaders | None = None
        self.request_headers = request_headers  # as the client sent them
        self.body = body
        self.record = record
        self.deadline = deadline  # monotonic; None: no total timeout
        self.has_idempotency_key = False
        # Called with (status, headers) for each 1xx interim answer the upstream sends
        # (103 Early Hints); the handler relays them to HTTP/1.1 clients.
        self.on_interim: Callable[[int, list[tuple[str, str]]], None] | None = None
        # Failover routes only: builds the request headers for another target from its
        # `HeaderPlan`, so each target gets its own Host and injected credentials.
        self.for_target: Callable[[HeaderPlan], OutgoingHeaders] | None = None
        # Set by the failover stage: (target index, reason) where the next attempt goes.
        self.hop: tuple[int, str] | None = None
        # The request's task (what an attempt's deadline cancels); None: the current task.
        self.task: asyncio.Task[Any] | None = None

    def headers_for(self, plan: HeaderPlan) -> OutgoingHeaders:
        """The request headers for a target other than the primary (built per attempt)."""
        build = self.for_target
        if build is None:
            raise RuntimeError("a failover target needs Call.for_target")
        return build(plan)

    @property
    def headers(self) -> OutgoingHeaders:
        """What is sent upstream; built on the first attempt, so a request that a breaker or
        bulkhead rejects never pays for it."""
        headers = self._headers
        if headers is None:
            headers = self._headers = self._make_headers()
        return headers


class Result:
    """The outcome of a pipeline (or of one stage)."""

    __slots__ = (
        "attempt",
        "cleanups",
        "failover",
        "failure",
        "response",
        "retry_after",
        "stale",
        "static",
        "total_timeout",
        "writer",
    )

    def __init__(
        self,
        response: UpstreamResponse | None = None,
        failure: str | None = None,
        *,
        retry_after: float | None = None,
        total_timeout: bool = False,
    ) -> None:
        self.response = response
        self.attempt: Attempt | None = None  # set by the attempt stage: what the breaker records
        self.failure = failure  # connect-failure | reset | timeout | breaker-open | bulkhead-full
        self.retry_after = retry_after  # seconds, for a breaker-open 503
        self.total_timeout = total_timeout  # the failure is the total deadline, not per_try
        # Set by the failover stage: the `failover.on` token when the next attempt may go
        # to the next target at once (no backoff); the retry stage decides whether it does.
        self.failover: str | None = None
        self.cleanups: list[Callable[[], None]] = []  # run once the response is finished
        self.stale: StaleHit | None = None
        self.static: StaticFallback | None = None
        self.writer: EntryWriter | None = None  # fallback store copy, fed while streaming

    def finish(self) -> None:
        """Run cleanups (bulkhead slots) exactly once."""
        cleanups, self.cleanups = self.cleanups, []
        for fn in cleanups:
            fn()

    def discard(self) -> None:
        """Drop a response that will not be sent (it is being retried or replaced). Its
        connection goes back to the pool when the body already arrived whole (a short 503):
        during an outage, retries then reuse connections instead of paying a new TCP and
        TLS handshake each."""
        if self.response is not None:
            self.response.release()
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.finish()


class Stage:
    """A pipeline element: applies one policy around the next stage."""

    __slots__ = ("next",)

    def __init__(self, next_stage: Stage | None) -> None:
        self.next = next_stage

    async def __call__(self, call: Call) -> Result:
        raise NotImplementedError

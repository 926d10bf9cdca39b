"""The proxy listener's request handler: refuse, route, run the pipeline, stream back.

Per request it reads the live `Runtime` once, so a reload never changes a request midway.
The connection protocol (`proxy.server.protocol`) hands it requests whose framing is
valid, in order, and frames whatever it answers.

Every answer's head is one bytes join: the status line, the varying lines (the upstream's
headers, `X-Resilience-Attempts`, `X-Request-Id`) and the route's prebuilt lines (`Via`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from email.utils import formatdate
from functools import partial
from typing import Any

from proxy.cache import cache_status_value
from proxy.clock import Clock, Rng
from proxy.config.model import Limits
from proxy.errors import (
    MESSAGES,
    RESILIENCE_REASONS,
    STATUS_FOR_FAILURE,
    BadRequestBody,
    BodyTooLarge,
    ClientBodyTimeout,
    ProxyError,
    error_body,
)
from proxy.headers import VIA_VALUE
from proxy.observe.access import client_request_id, new_request_id, trace_id
from proxy.observe.metrics import Metrics, RequestRecord, observe_unrouted
from proxy.server.forwarding import (
    client_head_lines,
    split_target,
    stored_head_lines,
    upstream_header_block,
)
from proxy.server.protocol import Request, encode_head
from proxy.server.runtime import RouteRuntime, Runtime
from proxy.stages.call import EMPTY_BODY, Call, RequestBody, Result, prepare_body
from proxy.upstream import UpstreamBodyError

_NO_BODY_STATUSES = frozenset((204, 304))
_CLOSING_STATUSES = frozenset((400, 408, 413, 431, 501, 505))
_VIA_LINE = f"Via: {VIA_VALUE}\r\n".encode()
_JSON_LINE = "Content-Type: application/json\r\n"
# Set by the handler on stored and static answers: the stored value, if any, is replaced.
_STALE_SET = frozenset(
    ("age", "x-resilience-fallback", "x-resilience-reason", "cache-status", "x-resilience-attempts")
)
_STATIC_SET = _STALE_SET - {"age"}
# Refusals that say when to come back (Retry-After on the proxy's own answer).
_RETRY_AFTER = frozenset(("breaker-open", "quota", "rate-limited"))
# Refusals that sent nothing upstream (Cache-Status says `hit`, not `fwd=stale`).
_NOT_FORWARDED = frozenset(("breaker-open", "bulkhead-full", "quota", "rate-limited"))
# What may fail while relaying an upstream body: the idle timeout, or the body breaking off.
_BODY_FAILURES = (TimeoutError, UpstreamBodyError)


class _DateLine:
    """`Date: <IMF-fixdate>\\r\\n` (RFC 9110 §6.6.1), formatted once per second."""

    __slots__ = ("clock", "line", "second")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.second = -1
        self.line = ""

    def __call__(self) -> str:
        second = int(self.clock.wall())
        if second != self.second:
            self.second = second
            self.line = f"Date: {formatdate(second, usegmt=True)}\r\n"
        return self.line


class Activity:
    """In-flight requests and the time of the last one, for the shutdown's quiet period."""

    __slots__ = ("active", "clock", "last")

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.active = 0
        self.last = clock.now()

    def started(self) -> None:
        self.active += 1  # while > 0 the quiet period cannot have begun

    def finished(self) -> None:
        self.active -= 1
        self.last = self.clock.now()


class ProxyHandler:
    """The listener's application: it answers each request the connection hands it."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        *,
        clock: Clock,
        rng: Rng,
        metrics: Metrics,
        activity: Activity,
        on_unparsed: Callable[[int], None] | None = None,
    ) -> None:
        self._runtime = runtime
        # Counts a request the connection refused (route "", outcome rejected, DESIGN §9).
        self._on_unparsed = on_unparsed
        self.clock = clock
        self.rng = rng
        self.metrics = metrics
        self.activity = activity
        self.date = _DateLine(clock)
        self._randbits = rng.getrandbits  # request IDs: 128 random bits as 32 hex digits

    # -- what the connection asks -------------------------------------------------------
    def limits(self) -> Limits:
        return self._runtime().config.limits

    def underscores(self) -> str:
        return self._runtime().config.headers_with_underscores

    def refuse(self, req: Request, error: ProxyError) -> None:
        """A request the connection refused (bad framing, slow or large head)."""
        rid = client_request_id(req.headers.get("X-Request-Id")) or new_request_id(self.rng)
        if self._on_unparsed is not None:
            self._on_unparsed(error.status)
        else:
            observe_unrouted(self.metrics, "OTHER", error.status, "rejected", 0.0)
        tail = f"X-Request-Id: {rid}\r\n{self.date()}"
        _send_error(req, tail, error.status, error.reason, "", error.message, None)
        access = self._runtime().access
        if access is not None and access.wanted(error.status, "rejected", 0.0):
            access.emit(_access_fields(req, None, rid, error.status, "rejected", None, 0.0))

    async def handle(self, req: Request) -> None:
        """One request, from admission to the last byte of its answer (and its metrics and
        access-log line). Everything a request without a body, a failover route or an
        interim answer does not need is skipped, not made."""
        activity = self.activity
        activity.active += 1  # while > 0 the shutdown's quiet period cannot have begun
        clock = self.clock
        start = clock.now()
        runtime = self._runtime()
        incoming = req.headers
        given = incoming.get("X-Request-Id")
        client_id = client_request_id(given) if given is not None else None
        rid = client_id or f"{self._randbits(128):032x}"
        ident = f"X-Request-Id: {rid}\r\n"  # on every answer (DESIGN §13)
        record: RequestRecord | None = None
        result: Result | None = None
        rt: RouteRuntime | None = None
        try:
            try:
                rt, path_qs = _admit(req, runtime)
            except ProxyError as exc:
                outcome = "no-route" if exc.status == 404 else "rejected"
                duration = clock.now() - start
                observe_unrouted(self.metrics, req.method, exc.status, outcome, duration)
                tail = ident + self.date()
                _send_error(req, tail, exc.status, exc.reason, exc.route, exc.message, None)
                access = runtime.access
                if access is not None and access.wanted(exc.status, outcome, duration):
                    access.emit(_access_fields(req, None, rid, exc.status, outcome, None, duration))
                return
            record = RequestRecord(req.method)
            if req.body is None:
                body = EMPTY_BODY  # most requests: nothing to read, check or buffer
            else:
                try:
                    body = await _read_body(req, rt, runtime.config.limits)
                except ProxyError as exc:
                    record.code, record.outcome = exc.status, "rejected"
                    tail = ident + self.date()
                    _send_error(req, tail, exc.status, exc.reason, rt.name, exc.message, None)
                    return
            call = Call(
                req.method,
                path_qs,
                partial(
                    upstream_header_block,
                    req.raw_headers,
                    incoming,
                    rt.header_plan,
                    req,
                    None if client_id is not None else rid,
                ),
                incoming,
                body,
                record,
                None,
            )
            call.task = req.task
            if not req.http10:
                call.on_interim = req.relay_interim
            if rt.failover:  # each target builds its own headers (Host, credentials)
                call.for_target = partial(
                    upstream_header_block,
                    req.raw_headers,
                    incoming,
                    client=req,
                    generated_id=None if client_id is not None else rid,
                )
            if rt.idempotency_header is not None:
                call.has_idempotency_key = rt.idempotency_header in incoming
            caller_ms = incoming.get("X-Resilience-Timeout-Ms")
            if caller_ms is not None:
                # A positive integer of ASCII digits (DESIGN §6); anything else is ignored.
                if caller_ms.isascii() and caller_ms.isdigit() and len(caller_ms) <= 12:
                    ms = int(caller_ms)
                    if ms > 0:
                        call.deadline = start + ms / 1000.0
            try:
                result = await rt.pipeline(call)
            except _CLIENT_BODY_ERRORS as exc:  # while the body streamed upstream
                error = _client_body_error(exc, runtime.config.limits)
                record.code, record.outcome = error.status, "rejected"
                tail = ident + self.date()
                _send_error(req, tail, error.status, error.reason, rt.name, error.message, None)
                return
            if result.response is not None:
                await _stream(req, rt, result, record, len(record.attempts), ident, self.date)
            else:
                _local(req, result, rt, record, len(record.attempts), ident, self.date)
        except asyncio.CancelledError:
            if record is not None:
                record.code, record.outcome = 499, "client-cancelled"
            raise
        finally:
            end = clock.now()
            activity.active -= 1
            activity.last = end
            if record is not None:
                assert rt is not None
                if result is not None:
                    if result.writer is not None and record.outcome != "ok":
                        result.writer.abort()
                    if record.outcome == "client-cancelled":
                        result.discard()
                    elif result.cleanups:
                        result.finish()
                rt.metrics.observe(record, end - start, rt.retry_enabled, end)
                access = runtime.access
                if access is not None and access.wanted(record.code, record.outcome, end - start):
                    access.emit(
                        _access_fields(
                            req, rt, rid, record.code, record.outcome, record, end - start
                        )
                    )


def _admit(req: Request, runtime: Runtime) -> tuple[RouteRuntime, str]:
    """The refusals of DESIGN §5 the connection leaves to us, then route matching; returns
    the route and the upstream path."""
    headers = req.headers
    if "Via" in headers:
        for via in headers.getall("Via"):
            if "resilience-proxy" in via:
                raise ProxyError(508, "loop", "the request already passed through this proxy")
    if "Upgrade" in headers:
        upgrade = headers["Upgrade"]
        if upgrade.strip().lower() != "h2c":
            # An h2c offer (`curl --http2`) may be ignored (RFC 9110 §7.8): the request is
            # served over HTTP/1.1. Anything else (WebSocket) needs a tunnel we do not offer.
            raise ProxyError(501, "upgrade", "protocol upgrades (WebSocket) are not supported")
    path, query = split_target(req.target)
    rt = runtime.match(path, req.host, req.method)
    if rt is None:
        raise ProxyError(404, "no-route", "no route matches this request")
    rest = path[rt.strip :] if rt.strip else path
    if rest.startswith("/"):
        rest = rest.lstrip("/")
    return rt, f"{rt.path_base}/{rest}{query}"


async def _read_body(req: Request, rt: RouteRuntime, limits: Limits) -> RequestBody:
    """The request body, read under the limits of the config the request started with."""
    stream = req.body
    assert stream is not None
    replay = rt.replay_body
    fallback = rt.route.fallback
    method = req.method
    if fallback is not None and method not in ("GET", "HEAD") and method in fallback.methods:
        replay = max(replay, 64 * 1024)
    length = req.content_length
    if length is not None and length > limits.max_request_body:
        raise ProxyError.body_too_large(limits.max_request_body)
    req.send_continue()  # after the size checks (DESIGN §5)
    try:
        return await prepare_body(
            stream, content_length=length, max_body=limits.max_request_body, replay_limit=replay
        )
    except _CLIENT_BODY_ERRORS as exc:
        raise _client_body_error(exc, limits) from None


_CLIENT_BODY_ERRORS = (ClientBodyTimeout, BodyTooLarge, BadRequestBody)


def _client_body_error(exc: Exception, limits: Limits) -> ProxyError:
    """The answer to a request body the client got wrong: too slow, too large, malformed."""
    if isinstance(exc, ClientBodyTimeout):
        return ProxyError(408, "client-timeout", "the request body arrived too slowly")
    if isinstance(exc, BodyTooLarge):
        return ProxyError.body_too_large(limits.max_request_body)
    return ProxyError.bad_request("the request body could not be parsed")


async def _stream(
    req: Request,
    rt: RouteRuntime,
    result: Result,
    record: RequestRecord,
    attempts: int,
    ident: str,
    date: Callable[[], str],
) -> None:
    upstream = result.response
    assert upstream is not None
    status = upstream.status
    record.code = status
    record.outcome = "upstream-status" if status >= 500 or status == 429 else "ok"
    target = record.target
    lines, length, has_date = client_head_lines(upstream.raw, rt.target_routes[target], req)
    # A proxy appends the Date an upstream left out (RFC 9110 §6.6.1).
    tail = (
        f"X-Resilience-Attempts: {attempts}\r\n{ident}"
        if has_date
        else (f"{date()}X-Resilience-Attempts: {attempts}\r\n{ident}")
    )
    head = b"".join((lines, tail.encode("latin-1"), rt.head_suffixes[target]))
    writer = result.writer
    content = upstream.content
    if req.method == "HEAD" or status in _NO_BODY_STATUSES:
        # Content-Length passes through on HEAD and 304, and is dropped on 204.
        req.start(status, upstream.reason, head, None if status == 204 else length, bodiless=True)
        if writer is not None:
            writer.finish()
            result.writer = None
        upstream.release()
        return
    if content.is_eof():
        # The whole body arrived with the head (most API answers): one write, no timer.
        body = content.read_nowait()
        if writer is not None:
            writer.feed(body)
            writer.finish()
            result.writer = None
        upstream.release()
        req.send_whole(status, upstream.reason, head, body)  # Content-Length recomputed
        return
    req.start(status, upstream.reason, head, length)
    idle = rt.route.timeout.idle
    client = rt.state.targets[target].client
    client.streaming += 1
    try:
        while True:
            chunk = content.read_nowait()
            if not chunk:
                if content.is_eof():
                    break
                # Nothing buffered: only now does the idle timeout need a timer.
                if idle is None:
                    chunk = await content.readany()
                else:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                if not chunk:
                    break
            if writer is not None:
                writer.feed(chunk)
            await req.write(chunk)
    except _BODY_FAILURES as exc:
        # Bytes already reached the client: the only honest signal left is to cut the
        # connection, so the client sees an incomplete response rather than a short one.
        record.outcome = "timeout" if isinstance(exc, TimeoutError) else "reset"
        if writer is not None:
            writer.abort()
            result.writer = None
        upstream.close()
        req.abort()
        return
    finally:
        client.streaming -= 1
    if writer is not None:
        writer.finish()
        result.writer = None
    upstream.release()
    req.end()


def _local(
    req: Request,
    result: Result,
    rt: RouteRuntime,
    record: RequestRecord,
    attempts: int,
    ident: str,
    date: Callable[[], str],
) -> None:
    """A fallback (stale or static) or the proxy's own error answer."""
    failure = result.failure
    reason = failure if failure in STATUS_FOR_FAILURE else "upstream-status"
    # Via, and on a failover route the target whose failure (or refusal) this stands for.
    suffix = rt.head_suffixes[record.target]
    if result.stale is not None:
        hit = result.stale
        # A stored answer keeps its own Date (its Age counts from it).
        tail = ident if hit.has_date else ident + date()
        status_value = cache_status_value(
            hit,
            forwarded=failure not in _NOT_FORWARDED,
            fwd_status=result.attempt.status if result.attempt is not None else None,
        )
        # hit.lines: the stored headers without framing and _STALE_SET, joined once per entry.
        lines = (
            f"{hit.lines}Age: {hit.age}\r\n"
            f"X-Resilience-Fallback: stale\r\nX-Resilience-Reason: {reason}\r\n"
            f"Cache-Status: {status_value}\r\nX-Resilience-Attempts: {attempts}\r\n{tail}"
        )
        record.code, record.outcome = hit.status, "fallback-stale"
        head_length = None
        if req.method == "HEAD":  # a GET entry served as headers only keeps its length
            head_length = next((v for n, v in hit.headers if n.lower() == "content-length"), None)
        req.send_whole(
            hit.status, "", encode_head(lines) + suffix, hit.body, head_length=head_length
        )
        return
    tail = ident + date()
    if result.static is not None:
        static = result.static
        lines = (
            f"{stored_head_lines(static.headers, _STATIC_SET)}X-Resilience-Fallback: static\r\n"
            f"X-Resilience-Reason: {reason}\r\nX-Resilience-Attempts: {attempts}\r\n"
            f"Cache-Status: resilience-proxy; fwd=uri-miss; detail=static-fallback\r\n{tail}"
        )
        record.code, record.outcome = static.status, "fallback-static"
        req.send_whole(static.status, "", encode_head(lines) + suffix, static.body)
        return
    failure = failure or "reset"
    status = STATUS_FOR_FAILURE.get(failure, 502)
    record.code, record.outcome = status, failure
    extra = None
    if failure in _RETRY_AFTER and result.retry_after is not None:
        extra = f"Retry-After: {max(1, math.ceil(result.retry_after))}\r\n"
    message = MESSAGES.get(failure, "upstream failure")
    _send_error(req, tail, status, failure, rt.name, message, attempts, extra, suffix)


def _send_error(
    req: Request,
    tail: str,
    status: int,
    reason: str,
    route: str,
    message: str,
    attempts: int | None,
    extra: str | None = None,
    suffix: bytes = _VIA_LINE,
) -> None:
    """The proxy's own JSON error answer (DESIGN §6)."""
    parts = [_JSON_LINE]
    if reason in RESILIENCE_REASONS:  # e.g. not no-route, bad-request
        parts.append(f"X-Resilience-Reason: {reason}\r\n")
    if attempts is not None:
        parts.append(f"X-Resilience-Attempts: {attempts}\r\n")
    if extra:
        parts.append(extra)
    parts.append(tail)  # X-Request-Id and Date
    if status in _CLOSING_STATUSES:
        req.close_after()
    req.send_whole(
        status, "", encode_head("".join(parts)) + suffix, error_body(reason, route, message)
    )


def _access_fields(
    req: Request,
    rt: RouteRuntime | None,
    rid: str,
    status: int,
    outcome: str,
    record: RequestRecord | None,
    duration: float,
) -> dict[str, Any]:
    """One access-log line (DESIGN §13): never the query string or a header value."""
    attempts = record.attempts if record is not None else []
    target = record.target if record is not None else 0
    breaker = rt.state.targets[target].breaker if rt is not None else None
    fallback = outcome[len("fallback-") :] if outcome.startswith("fallback-") else None
    return {
        "route": rt.name if rt is not None else "",
        "upstream": rt.target_names[target] if rt is not None else "",
        "method": req.method,
        "path": req.target.partition("?")[0],
        "status": status,
        "outcome": outcome,
        "attempts": len(attempts),
        "retry_reasons": list(record.retries) if record is not None else [],
        "fallback": fallback,
        "breaker": breaker.state if breaker is not None else None,
        "duration_ms": round(duration * 1000, 3),
        "upstream_ms": round(sum(a[1] for a in attempts) * 1000, 3),
        "bytes_in": req.body.received if req.body is not None else 0,
        "bytes_out": req.bytes_out,
        "request_id": rid,
        "trace_id": trace_id(req.headers.get("traceparent")),
    }

"""The proxy listener's request handler: refuse, route, run the pipeline, stream back.

Per request it reads the live `Runtime` once, so a reload never changes a request midway.
"""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.cache import cache_status_value
from proxy.errors import (
    MESSAGES,
    RETRY_AFTER_FAILURES,
    STATUS_FOR_FAILURE,
    ProxyError,
    error_body,
)
from proxy.headers import VIA_VALUE
from proxy.observe.metrics import RequestRecord, observe_unrouted
from proxy.server.body import BodyTooLarge, ClientBodyTimeout, prepare_body
from proxy.server.forwarding import (
    build_client_headers,
    build_upstream_headers,
    split_target,
    upstream_path,
)
from proxy.stages.call import EMPTY_BODY, Call, RequestBody, Result
from proxy.upstream import UpstreamBodyError

if TYPE_CHECKING:
    from proxy.config.model import Limits
    from proxy.server.app import ProxyApp
    from proxy.server.runtime import RouteRuntime, Runtime

_NO_BODY_STATUSES = frozenset((204, 304))
_JSON = "application/json"


class ProxyHandler:
    """aiohttp low-level handler for the proxy listener."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        app = self.app
        app.requests_started()
        try:
            return await self._handle(request)
        finally:
            app.requests_finished()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        app = self.app
        clock = app.clock
        start = clock.now()
        runtime = app.runtime
        method = request.method
        try:
            rt, path_qs = self._admit(request, runtime)
        except ProxyError as exc:
            outcome = "no-route" if exc.status == 404 else "rejected"
            observe_unrouted(app.metrics, method, exc.status, outcome, clock.now() - start)
            return _error_response(exc.status, exc.reason, exc.route, exc.message, attempts=None)

        record = RequestRecord(method)
        response: web.StreamResponse | None = None
        result: Result | None = None
        try:
            try:
                body = await self._read_body(request, rt, runtime.config.limits)
            except ProxyError as exc:
                record.code, record.outcome = exc.status, "rejected"
                response = _error_response(exc.status, exc.reason, rt.name, exc.message, None)
                return response
            incoming = request.headers
            make_headers = partial(build_upstream_headers, incoming, rt.header_plan, request)
            call = Call(method, path_qs, make_headers, incoming, body, record, None)
            if rt.failover:  # each target builds its own headers (Host, credentials)
                call.for_target = partial(build_upstream_headers, incoming, client=request)
            if rt.idempotency_header is not None:
                call.has_idempotency_key = rt.idempotency_header in incoming
            caller_ms = incoming.get("X-Resilience-Timeout-Ms")
            if caller_ms is not None and caller_ms.isdigit() and int(caller_ms) > 0:
                call.deadline = start + int(caller_ms) / 1000.0
            try:
                result = await rt.pipeline(call)
            except ClientBodyTimeout:
                record.code, record.outcome = 408, "rejected"
                return _error_response(
                    408, "client-timeout", rt.name, "the request body arrived too slowly", None
                )
            except BodyTooLarge:
                record.code, record.outcome = 413, "rejected"
                limit = runtime.config.limits.max_request_body
                return _error_response(
                    413, "body-too-large", rt.name, f"the request body exceeds {limit} bytes", None
                )
            attempts = len(record.attempts)
            if result.response is not None:
                response = await self._stream(request, rt, result, record, attempts)
                return response
            response = self._local(result, rt, record, attempts)
            return response
        except asyncio.CancelledError:
            record.code, record.outcome = 499, "client-cancelled"
            raise
        finally:
            if result is not None:
                if result.writer is not None and record.outcome != "ok":
                    result.writer.abort()
                result.discard() if record.outcome == "client-cancelled" else result.finish()
            end = clock.now()
            rt.metrics.observe(record, end - start, rt.retry_enabled, end)

    def _admit(self, request: web.BaseRequest, runtime: Runtime) -> tuple[RouteRuntime, str]:
        """Every refusal of DESIGN §5, then route matching; returns the route and upstream path."""
        method = request.method
        if method == "CONNECT":
            raise ProxyError.bad_request("CONNECT is not supported: this is not a forward proxy")
        raw = request.raw_path
        limits = runtime.config.limits
        head = len(method) + len(raw) + 12
        for name, value in request.raw_headers:
            head += len(name) + len(value) + 4
        if head > limits.max_header_bytes:
            raise ProxyError.head_too_large(limits.max_header_bytes)
        headers = request.headers
        for via in headers.getall("Via", ()):
            if "resilience-proxy" in via:
                raise ProxyError(508, "loop", "the request already passed through this proxy")
        upgrade = headers.get("Upgrade")
        if upgrade is not None and upgrade.strip().lower() != "h2c":
            # An h2c offer (`curl --http2`) may be ignored (RFC 9110 §7.8): the request is
            # served over HTTP/1.1. Anything else (WebSocket) needs a tunnel we do not offer.
            raise ProxyError(501, "upgrade", "protocol upgrades (WebSocket) are not supported")
        path, query = split_target(raw)
        rt = runtime.match(path, request.host, method)
        if rt is None:
            raise ProxyError(404, "no-route", "no route matches this request")
        return rt, upstream_path(rt.route, path) + query

    async def _read_body(
        self, request: web.BaseRequest, rt: RouteRuntime, limits: Limits
    ) -> RequestBody:
        """The request body, read under the limits of the config the request started with."""
        if not request.body_exists:
            return EMPTY_BODY  # most requests: nothing to read, check or buffer
        replay = rt.replay_body
        fallback = rt.route.fallback
        if fallback is not None and request.method not in ("GET", "HEAD"):
            if request.method in fallback.methods:
                replay = max(replay, 64 * 1024)
        length = request.content_length
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        if length is not None and length > limits.max_request_body:
            raise ProxyError.body_too_large(limits.max_request_body)
        if request.headers.get("Expect", "").lower() == "100-continue" and (length or chunked):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            return await prepare_body(
                request.content,
                content_length=length,
                chunked=chunked,
                max_body=limits.max_request_body,
                replay_limit=replay,
                gap=limits.client_body_timeout,
            )
        except ClientBodyTimeout:
            raise ProxyError(408, "client-timeout", "the request body arrived too slowly") from None

    async def _stream(
        self,
        request: web.BaseRequest,
        rt: RouteRuntime,
        result: Result,
        record: RequestRecord,
        attempts: int,
    ) -> web.StreamResponse:
        upstream = result.response
        assert upstream is not None
        status = upstream.status
        record.code = status
        record.outcome = "upstream-status" if status >= 500 or status == 429 else "ok"
        up_headers = upstream.headers
        target = record.target
        headers = build_client_headers(
            up_headers.items(),
            up_headers.getall("Connection", []),
            rt.target_routes[target],
            request,
        )
        headers["X-Resilience-Attempts"] = str(attempts)
        if rt.failover:
            headers["X-Resilience-Upstream"] = rt.target_names[target]
        writer = result.writer
        content = upstream.content
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            response: web.StreamResponse = StreamedResponse(
                status=status, reason=upstream.reason, headers=headers
            )
            await response.prepare(request)
            if writer is not None:
                writer.finish()
                result.writer = None
            upstream.release()
            return response
        if content.is_eof():
            # The whole body arrived with the head (most API answers): one write, no timer.
            body = content.read_nowait()
            if writer is not None:
                writer.feed(body)
                writer.finish()
                result.writer = None
            upstream.release()
            headers.popall("Content-Length", None)  # recomputed from the complete body
            return WholeResponse(status=status, reason=upstream.reason, headers=headers, body=body)
        response = StreamedResponse(status=status, reason=upstream.reason, headers=headers)
        await response.prepare(request)
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
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError, UpstreamBodyError) as exc:
            # Bytes already reached the client: the only honest signal left is to cut the
            # connection, so the client sees an incomplete response rather than a short one.
            record.outcome = "timeout" if isinstance(exc, TimeoutError) else "reset"
            if writer is not None:
                writer.abort()
                result.writer = None
            upstream.close()
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            client.streaming -= 1
        if writer is not None:
            writer.finish()
            result.writer = None
        upstream.release()
        await response.write_eof()
        return response

    def _local(
        self, result: Result, rt: RouteRuntime, record: RequestRecord, attempts: int
    ) -> web.StreamResponse:
        failure = result.failure
        reason = failure if failure in STATUS_FOR_FAILURE else "upstream-status"
        # On a failover route: the target whose failure (or refusal) this answer stands for.
        upstream = rt.target_names[record.target] if rt.failover else None
        if result.stale is not None:
            hit = result.stale
            headers = CIMultiDict(hit.headers)
            headers["Age"] = str(hit.age)
            headers["X-Resilience-Fallback"] = "stale"
            headers["X-Resilience-Reason"] = reason
            headers["Cache-Status"] = cache_status_value(
                hit,
                forwarded=failure not in ("breaker-open", "bulkhead-full", "quota"),
                fwd_status=result.attempt.status if result.attempt is not None else None,
            )
            headers["X-Resilience-Attempts"] = str(attempts)
            if upstream is not None:
                headers["X-Resilience-Upstream"] = upstream
            headers.add("Via", VIA_VALUE)
            record.code, record.outcome = hit.status, "fallback-stale"
            return WholeResponse(status=hit.status, headers=headers, body=hit.body)
        if result.static is not None:
            static = result.static
            headers = CIMultiDict(static.headers)
            headers["X-Resilience-Fallback"] = "static"
            headers["X-Resilience-Reason"] = reason
            headers["X-Resilience-Attempts"] = str(attempts)
            if upstream is not None:
                headers["X-Resilience-Upstream"] = upstream
            headers["Cache-Status"] = "resilience-proxy; fwd=uri-miss; detail=static-fallback"
            headers.add("Via", VIA_VALUE)
            record.code, record.outcome = static.status, "fallback-static"
            return WholeResponse(status=static.status, headers=headers, body=static.body)
        failure = failure or "reset"
        status = STATUS_FOR_FAILURE.get(failure, 502)
        record.code, record.outcome = status, failure
        extra = {} if upstream is None else {"X-Resilience-Upstream": upstream}
        if failure in RETRY_AFTER_FAILURES and result.retry_after is not None:
            extra["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
        return _error_response(
            status, failure, rt.name, MESSAGES.get(failure, "upstream failure"), attempts, extra
        )


class _AddsNothing(web.StreamResponse):
    """aiohttp adds `Server` and a default `Content-Type` while preparing a response; the
    proxy relays what the upstream sent and nothing else (and does not advertise its own
    software on the answers it makes itself), so those are taken back out."""

    async def _prepare_headers(self) -> None:
        headers = self.headers
        absent = [name for name in ("Server", "Content-Type") if name not in headers]
        await super()._prepare_headers()
        for name in absent:
            headers.popall(name, None)


class StreamedResponse(_AddsNothing):
    """An upstream response relayed as its body arrives."""


class WholeResponse(_AddsNothing, web.Response):
    """A complete response (upstream, fallback or the proxy's own), sent in one write."""


def _error_response(
    status: int,
    reason: str,
    route: str,
    message: str,
    attempts: int | None,
    extra: dict[str, str] | None = None,
) -> web.Response:
    headers = CIMultiDict({"Content-Type": _JSON})
    if reason in STATUS_FOR_FAILURE:
        headers["X-Resilience-Reason"] = reason
    if attempts is not None:
        headers["X-Resilience-Attempts"] = str(attempts)
    if extra:
        headers.update(extra)
    headers["Via"] = VIA_VALUE
    response = WholeResponse(
        status=status, headers=headers, body=error_body(reason, route, message)
    )
    if status in (400, 408, 413, 431, 501):
        response.force_close()
    return response

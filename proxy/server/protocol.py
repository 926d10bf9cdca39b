"""The proxy listener's connection protocol: aiohttp's, plus the client limits of DESIGN §4.

- `client_header_timeout`: a request head that has started arriving must be complete in
  time, else 408 and the connection closes (slowloris).
- Parse errors answer 400 with the proxy's JSON body; an over-long head line answers 431.
- `client_idle_timeout` is aiohttp's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from proxy.errors import error_body
from proxy.observe import log


def _where(exc: BaseException | None) -> str:
    """file:line of the innermost frame, for a bug report without a multi-line traceback."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""


def _raw_response(status: int, phrase: str, reason: str, message: str) -> bytes:
    body = error_body(reason, "", message)
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nVia: 1.1 resilience-proxy\r\nConnection: close\r\n\r\n"
    ).encode() + body


class ProxyProtocol(web_protocol.RequestHandler):
    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._in_request = True
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and not self._in_request and self._head_timer is None:
            # Part of a head arrived but not all of it: from now on it has a deadline. A
            # head that arrives whole (the common case) never arms a timer.
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if (
            transport is None
            or self._in_request
            or self._current_request is not None  # a (pipelined) request is being handled
            or transport.is_closing()
        ):
            return
        message = "the request head arrived too slowly"
        self._count_unparsed(408)
        transport.write(_raw_response(408, "Request Timeout", "client-timeout", message))
        self.force_close()
        transport.close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False

    def _count_unparsed(self, status: int) -> None:
        server = self._manager
        if isinstance(server, ProxyServer):
            server.count_unparsed(status)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            log.error("request_failed", error=f"{type(exc).__name__}: {exc}", where=_where(exc))
            raise ConnectionError("the response had started; the connection is closed")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
        ):
            status, reason, text = 431, "header-too-large", "the request head is too large"
        elif status == 400 or isinstance(exc, BadHttpMessage):
            status, reason, text = 400, "bad-request", "the request could not be parsed"
        else:
            status, reason, text = 500, "internal", "the proxy failed to handle the request"
            log.error(
                "request_failed",
                error=f"{type(exc).__name__}: {exc}" if exc else "unknown",
                where=_where(exc),
            )
        if status != 500:  # a request that could not be parsed: route "", outcome rejected
            self._count_unparsed(status)
        response = web.Response(
            status=status,
            body=error_body(reason, "", text),
            headers={"Content-Type": "application/json", "Via": "1.1 resilience-proxy"},
        )
        response.force_close()
        return response


class ProxyServer(web.Server):
    """`web.Server` that builds `ProxyProtocol` connections."""

    def __init__(
        self,
        handler: Any,
        *,
        head_timeout: float,
        on_unparsed: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._head_timeout = head_timeout
        self._on_unparsed = on_unparsed

    def count_unparsed(self, status: int) -> None:
        """A request refused before it could be parsed (400, 408, 431): for the metrics."""
        if self._on_unparsed is not None:
            self._on_unparsed(status)

    def __call__(self) -> ProxyProtocol:
        return ProxyProtocol(self, loop=self._loop, head_timeout=self._head_timeout, **self._kwargs)

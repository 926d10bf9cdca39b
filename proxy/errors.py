"""Errors the proxy answers with itself (DESIGN §6, last part).

    ProxyError                       one JSON body shape: {"error": {"reason", "route", "message"}}
    ├── 429 quota | rate-limited     provider quota held back / caller over its rate; Retry-After
    ├── 400 bad-request              malformed target, dot-segments, absolute-form, CONNECT
    ├── 404 no-route                 no configured route matched (never an open proxy)
    ├── 408 client-timeout           request head or body too slow
    ├── 413 body-too-large           over limits.max_request_body
    ├── 431 header-too-large         over limits.max_header_bytes
    ├── 501 upgrade                  Upgrade / WebSocket
    ├── 501 unsupported-coding       a transfer coding other than chunked (gzip, chunked)
    ├── 505 unsupported-version      an HTTP major version other than 1
    ├── 508 loop                     the request already passed through this proxy
    ├── 502 connect-failure | reset  upstream unreachable or reset
    ├── 503 breaker-open             with Retry-After
    ├── 503 bulkhead-full
    └── 504 timeout                  the total timeout expired

Raised while reading the client's request body (by the listener's body stream), so that
the request is the client's fault and not the upstream's:

    ClientBodyTimeout                408: a gap between body chunks over client_body_timeout
    BodyTooLarge                     413: more than limits.max_request_body arrived
    BadRequestBody                   400: the body's framing broke (a bad chunk size)

Messages never carry exception text, secrets or a URL with its query.
Configuration errors live in `proxy.config` (`ConfigInvalid`, one `Problem` per line).
"""

from __future__ import annotations

import functools
import json

# X-Resilience-Reason values (DESIGN §6): only these reasons are sent in that header.
RESILIENCE_REASONS = frozenset(
    (
        "breaker-open",
        "bulkhead-full",
        "timeout",
        "connect-failure",
        "reset",
        "upstream-status",
        "quota",
        "rate-limited",
    )
)

STATUS_FOR_FAILURE = {
    "connect-failure": 502,
    "reset": 502,
    "breaker-open": 503,
    "bulkhead-full": 503,
    "timeout": 504,
    "quota": 429,
    "rate-limited": 429,
    "upstream-status": 502,  # an answer the proxy cannot relay (an unasked-for 101)
}

MESSAGES = {
    "connect-failure": "the upstream could not be reached",
    "reset": "the upstream closed the connection",
    "breaker-open": "the circuit breaker for this upstream is open",
    "bulkhead-full": "too many concurrent requests to this upstream",
    "timeout": "the upstream did not answer in time",
    "quota": "the upstream's quota is spent until its reset",
    "rate-limited": "too many requests: over this route's rate limit",
    "upstream-status": "the upstream sent a response the proxy cannot relay",
}


class ProxyError(Exception):
    """A request the proxy answers itself, before or instead of the upstream."""

    def __init__(self, status: int, reason: str, message: str, route: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.route = route

    def body(self) -> bytes:
        return error_body(self.reason, self.route, self.message)

    @classmethod
    def bad_request(cls, message: str) -> ProxyError:
        return cls(400, "bad-request", message)

    @classmethod
    def body_too_large(cls, limit: int) -> ProxyError:
        return cls(413, "body-too-large", f"the request body exceeds {limit} bytes")

    @classmethod
    def head_too_large(cls, limit: int) -> ProxyError:
        return cls(431, "header-too-large", f"the request head exceeds {limit} bytes")


class ClientBodyTimeout(Exception):
    """The client paused longer than limits.client_body_timeout between body chunks."""


class BodyTooLarge(Exception):
    """The client sent more than limits.max_request_body."""


class BadRequestBody(Exception):
    """The request body's framing was invalid after its head had been accepted."""


@functools.lru_cache(maxsize=512)
@functools.lru_cache(maxsize=1024)
def error_body(reason: str, route: str, message: str) -> bytes:
    """The JSON body of one of the proxy's own errors (cached: the same few are sent over
    and over while a breaker is open or a bulkhead is full)."""
    return json.dumps(
        {"error": {"reason": reason, "route": route, "message": message}}, separators=(",", ":")
    ).encode()

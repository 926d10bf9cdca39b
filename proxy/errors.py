"""Errors the proxy answers with itself (DESIGN §6, last part).

    ProxyError                       one JSON body shape: {"error": {"reason", "route", "message"}}
    ├── 429 quota | rate-limited     provider quota held back / caller over its rate; Retry-After
    ├── 400 bad-request              malformed target, dot-segments, absolute-form, CONNECT
    ├── 404 no-route                 no configured route matched (never an open proxy)
    ├── 408 client-timeout           request head or body too slow
    ├── 413 body-too-large           over limits.max_request_body
    ├── 431 header-too-large         over limits.max_header_bytes
    ├── 501 upgrade                  Upgrade / WebSocket
    ├── 508 loop                     the request already passed through this proxy
    ├── 502 connect-failure | reset  upstream unreachable or reset
    ├── 503 breaker-open             with Retry-After
    ├── 503 bulkhead-full
    └── 504 timeout                  the total timeout expired

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

# Failures whose answer carries Retry-After (seconds, rounded up, at least 1).
RETRY_AFTER_FAILURES = frozenset(("breaker-open", "quota", "rate-limited"))


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


@functools.lru_cache(maxsize=512)
def error_body(reason: str, route: str, message: str) -> bytes:
    return json.dumps(
        {"error": {"reason": reason, "route": route, "message": message}}, separators=(",", ":")
    ).encode()

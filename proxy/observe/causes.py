"""Why upstream attempts fail, logged so an operator can tell a wrong `ca_file` from an
outage (DESIGN §13, last bullet).

`cause_of` names the cause of an `UpstreamFailure` from its exception chain: the client's
own `cause` string when it sets one, else the errno name of an `OSError` (`ECONNREFUSED`),
the verification message of a certificate error (`CERTIFICATE_VERIFY_FAILED: self-signed
certificate`), or a timeout. Never an exception's free text: that may hold a URL.

`FailureLog` writes one `upstream_attempt_failed` warning per (route, upstream, cause) per
`window` seconds (10 s), with `suppressed` = the failures of that key left unlogged since its
previous line, and keeps the last cause per (route, upstream) for the status page. Pure
logic: the clock and the line writer are injected.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.clock import Clock
from proxy.observe import log

WINDOW = 10.0  # seconds between two lines of one (route, upstream, cause)
MAX_KEYS = 1024  # (route, upstream, cause) kept; older quiet ones are forgotten first
_CHAIN_DEPTH = 8
# Exception classes of today's client whose names say less than a few words do.
_NAMED = {
    "ServerDisconnectedError": "closed by the upstream before the response head",
    "ClientPayloadError": "the response body broke off",
}


def cause_of(exc: BaseException, connect_timeout: float | None = None) -> str:
    """A short, secret-free name for why an attempt failed (see the module docstring)."""
    given = getattr(exc, "cause", "")
    if isinstance(given, str) and given:
        return given
    seen: BaseException | None = exc.__cause__ or exc.__context__
    for _ in range(_CHAIN_DEPTH):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            message = seen.verify_message or "certificate verify failed"
            return f"CERTIFICATE_VERIFY_FAILED: {message}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS: {seen.reason or type(seen).__name__}"
        if isinstance(seen, TimeoutError):
            if connect_timeout is not None:
                return f"connect timeout after {connect_timeout:.2f}s"
            return "timeout"
        if isinstance(seen, OSError) and seen.errno:
            return errno.errorcode.get(seen.errno, f"errno {seen.errno}")
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            name = type(seen).__name__  # e.g. BadStatusLine
            return _NAMED.get(name, name)
        seen = nxt
    kind = getattr(exc, "kind", "")
    return str(kind) if kind else type(exc).__name__


@dataclass(frozen=True, slots=True)
class LastFailure:
    outcome: str  # connect-failure | reset | timeout | status
    cause: str
    at: float  # epoch seconds


class FailureLog:
    """Rate-limited failure-cause warnings and the last cause per (route, upstream)."""

    __slots__ = ("_clock", "_seen", "_write", "latest", "window")

    def __init__(
        self,
        clock: Clock,
        window: float = WINDOW,
        write: Callable[..., Any] | None = None,
    ) -> None:
        self._clock = clock
        self.window = window
        self._write = write if write is not None else log.warning
        # (route, upstream, cause) → [monotonic time of its last line, suppressed since]
        self._seen: dict[tuple[str, str, str], list[float]] = {}
        self.latest: dict[tuple[str, str], LastFailure] = {}

    def failed(self, route: str, upstream: str, outcome: str, cause: str) -> None:
        """One failed attempt: logged now, or counted into the next line of its key."""
        cause = log.scrub(cause)  # defensively: a client-supplied cause never carries a secret
        now = self._clock.now()
        self.latest[(route, upstream)] = LastFailure(outcome, cause, self._clock.wall())
        key = (route, upstream, cause)
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return
        suppressed = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._seen) >= MAX_KEYS:
            self._forget(now)
        self._seen[key] = [now, 0]
        self._write(
            "upstream_attempt_failed",
            route=route,
            upstream=upstream,
            outcome=outcome,
            cause=cause,
            suppressed=suppressed,
        )

    def last(self, route: str, upstream: str) -> LastFailure | None:
        return self.latest.get((route, upstream))

    def forget_route(self, route: str) -> None:
        """A removed route's state is dropped (DESIGN §2)."""
        for key in [k for k in self._seen if k[0] == route]:
            del self._seen[key]
        for key2 in [k for k in self.latest if k[0] == route]:
            del self.latest[key2]

    def _forget(self, now: float) -> None:
        quiet = [k for k, (t, n) in self._seen.items() if now - t >= self.window and not n]
        for key in quiet or list(self._seen)[: len(self._seen) // 2]:
            del self._seen[key]

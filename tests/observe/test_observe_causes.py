"""Failure causes (DESIGN §13): named from the exception chain, logged at most once per
route, upstream and cause per 10 s with the suppressed count; stepped on a fake clock."""

from __future__ import annotations

import errno
import ssl
from typing import Any

from proxy.clock import FakeClock
from proxy.observe.causes import FailureLog, cause_of
from proxy.upstream import UpstreamFailure


def failure(inner: BaseException | None, kind: str = "connect-failure") -> UpstreamFailure:
    try:
        try:
            if inner is not None:
                raise inner
            raise UpstreamFailure(kind, before_request=True)
        except UpstreamFailure:
            raise
        except BaseException as exc:
            raise UpstreamFailure(kind, before_request=True) from exc
    except UpstreamFailure as outer:
        return outer


def test_refused_reset_and_other_errnos_are_named_by_errno() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 443)")
    assert cause_of(failure(refused)) == "ECONNREFUSED"
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert cause_of(failure(reset, "reset")) == "ECONNRESET"
    assert cause_of(failure(OSError(errno.EHOSTUNREACH, "No route"))) == "EHOSTUNREACH"


def test_certificate_errors_carry_the_verify_message() -> None:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    exc.verify_message = "self-signed certificate"
    assert cause_of(failure(exc)) == "CERTIFICATE_VERIFY_FAILED: self-signed certificate"


def test_a_connect_timeout_names_its_limit() -> None:
    assert cause_of(failure(TimeoutError()), connect_timeout=2.0) == "connect timeout after 2.00s"


def test_the_clients_own_cause_wins_and_free_text_never_leaks() -> None:
    exc = failure(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    exc.cause = "ECONNREFUSED (from the client)"  # type: ignore[attr-defined]
    assert cause_of(exc) == "ECONNREFUSED (from the client)"

    class Disconnected(Exception):
        pass

    secret = Disconnected("https://user:hunter2@api.example.com/x?token=abc")
    cause = cause_of(failure(secret, "reset"))
    assert cause == "Disconnected" and "hunter2" not in cause and "token" not in cause
    assert cause_of(failure(None, "reset")) == "reset"


class Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def test_one_line_per_key_per_window_with_the_suppressed_count() -> None:
    clock, lines = FakeClock(), Lines()
    log = FailureLog(clock, write=lines)
    for _ in range(5):
        log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
        clock.advance(1.0)
    assert len(lines.lines) == 1
    assert lines.lines[0] == {
        "event": "upstream_attempt_failed", "route": "gh", "upstream": "github",
        "outcome": "connect-failure", "cause": "ECONNREFUSED", "suppressed": 0,
    }  # fmt: skip
    clock.advance(4.9)  # 9.9 s after the first line: still inside the window
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
    assert len(lines.lines) == 1
    clock.advance(0.1)  # 10 s: the next failure logs, with the 5 it held back
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
    assert len(lines.lines) == 2 and lines.lines[1]["suppressed"] == 5
    clock.advance(30.0)
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
    assert lines.lines[2]["suppressed"] == 0


def test_causes_routes_and_upstreams_are_limited_apart() -> None:
    clock, lines = FakeClock(), Lines()
    log = FailureLog(clock, write=lines)
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
    log.failed("gh", "github", "timeout", "timeout after 2.00s")
    log.failed("gh", "mirror", "connect-failure", "ECONNREFUSED")
    log.failed("hf", "github", "connect-failure", "ECONNREFUSED")
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")  # suppressed
    assert len(lines.lines) == 4


def test_the_last_cause_per_route_and_upstream_is_kept_for_the_status_page() -> None:
    clock, lines = FakeClock(), Lines()
    log = FailureLog(clock, write=lines)
    assert log.last("gh", "github") is None
    log.failed("gh", "github", "connect-failure", "ECONNREFUSED")
    clock.advance(1.0)
    log.failed("gh", "github", "status", "status 503")  # logged: another cause
    last = log.last("gh", "github")
    assert last is not None
    assert (last.outcome, last.cause, last.at) == ("status", "status 503", clock.wall())
    log.forget_route("gh")
    assert log.last("gh", "github") is None

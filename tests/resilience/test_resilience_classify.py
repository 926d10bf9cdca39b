"""Which outcomes are retriable, by which `on` token, and every rule of decide_retry."""

from __future__ import annotations

from dataclasses import replace

from proxy.config.model import RetryAfterPolicy, RetryOn, RetryPolicy, StatusSet
from proxy.resilience.classify import (
    Attempt,
    AttemptResult,
    RetryDecision,
    decide_retry,
    result_for_status,
    retry_reason,
    retry_wait,
)

CONNECT = Attempt(AttemptResult.CONNECT_FAILURE)
RESET_EARLY = Attempt(AttemptResult.RESET, reset_before_request=True)
RESET_LATE = Attempt(AttemptResult.RESET)
TIMEOUT = Attempt(AttemptResult.TIMEOUT, duration=10.0)


def on(*tokens: str) -> RetryOn:
    statuses = StatusSet(
        tuple(t for t in tokens if t not in ("connect-failure", "reset", "timeout")),
        frozenset().union(
            *(
                {502, 503, 504}
                if t == "gateway-error"
                else set(range(500, 600))
                if t == "5xx"
                else {int(t)}
                for t in tokens
                if t not in ("connect-failure", "reset", "timeout")
            )
        ),
    )
    return RetryOn(
        connect_failure="connect-failure" in tokens,
        reset="reset" in tokens,
        timeout="timeout" in tokens,
        statuses=statuses,
        tokens=tokens,
    )


def test_response_labels() -> None:
    assert result_for_status(200) is AttemptResult.OK
    assert result_for_status(404) is AttemptResult.OK
    assert result_for_status(429) is AttemptResult.STATUS
    assert result_for_status(503) is AttemptResult.STATUS
    assert Attempt.response(503, 0.2, 4.0) == Attempt(AttemptResult.STATUS, 503, False, 0.2, 4.0)


def test_transport_outcomes_match_their_own_token() -> None:
    everything = on("connect-failure", "reset", "timeout")
    assert retry_reason(everything, CONNECT) == "connect-failure"
    assert retry_reason(everything, RESET_LATE) == "reset"
    assert retry_reason(everything, RESET_EARLY) == "reset"
    assert retry_reason(everything, TIMEOUT) == "timeout"
    assert retry_reason(on("reset", "timeout"), CONNECT) is None
    assert retry_reason(on("connect-failure"), RESET_EARLY) is None
    assert retry_reason(on("connect-failure"), TIMEOUT) is None


def test_statuses_are_labelled_by_the_token_that_matched() -> None:
    rules = on("429", "gateway-error", "5xx")
    assert retry_reason(rules, Attempt.response(503)) == "gateway-error"
    assert retry_reason(rules, Attempt.response(500)) == "5xx"
    assert retry_reason(rules, Attempt.response(429)) == "429"
    assert retry_reason(rules, Attempt.response(404)) is None
    assert retry_reason(rules, Attempt.response(200)) is None


def test_plain_string_results_work_like_the_enum() -> None:
    # The attempt stage may build outcomes from the upstream client's failure kind.
    assert retry_reason(on("reset"), Attempt("reset")) == "reset"  # type: ignore[arg-type]
    assert Attempt("connect-failure").nothing_sent  # type: ignore[arg-type]


POLICY = RetryPolicy(max_attempts=3)


def decide(outcome: Attempt, policy: RetryPolicy = POLICY, **kw: object) -> RetryDecision:
    args: dict[str, object] = {
        "method": "GET",
        "has_idempotency_key": False,
        "attempt": 1,
        "body_replayable": True,
        "time_left": None,
        "wait": 0.5,
    }
    args.update(kw)
    return decide_retry(policy, outcome, **args)  # type: ignore[arg-type]


def test_a_matching_outcome_with_attempts_left_is_retried() -> None:
    assert decide(Attempt.response(503)) is RetryDecision.RETRY
    assert decide(TIMEOUT, attempt=2) is RetryDecision.RETRY


def test_outcomes_outside_on_are_not_retriable() -> None:
    assert decide(Attempt.response(200)) is RetryDecision.NOT_RETRIABLE
    assert decide(Attempt.response(500)) is RetryDecision.NOT_RETRIABLE  # default on: 502-504
    assert decide(TIMEOUT, replace(POLICY, on=on("5xx"))) is RetryDecision.NOT_RETRIABLE


def test_attempts_are_bounded_by_max_attempts() -> None:
    assert decide(Attempt.response(503), attempt=3) is RetryDecision.ATTEMPTS_EXHAUSTED
    single = replace(POLICY, max_attempts=1)
    assert decide(CONNECT, single) is RetryDecision.ATTEMPTS_EXHAUSTED


def test_non_idempotent_methods_need_the_idempotency_header() -> None:
    assert decide(Attempt.response(503), method="POST") is RetryDecision.METHOD
    assert decide(TIMEOUT, method="PATCH") is RetryDecision.METHOD
    assert decide(RESET_LATE, method="POST") is RetryDecision.METHOD
    assert (
        decide(Attempt.response(503), method="POST", has_idempotency_key=True)
        is RetryDecision.RETRY
    )
    no_header = replace(POLICY, idempotency_header=None)
    assert (
        decide(Attempt.response(503), no_header, method="POST", has_idempotency_key=True)
        is RetryDecision.METHOD
    )
    assert decide(Attempt.response(503), method="DELETE") is RetryDecision.RETRY


def test_nothing_sent_is_retried_for_any_method() -> None:
    assert decide(CONNECT, method="POST") is RetryDecision.RETRY
    assert decide(RESET_EARLY, method="POST") is RetryDecision.RETRY


def test_a_consumed_streamed_body_cannot_be_replayed() -> None:
    assert decide(Attempt.response(503), body_replayable=False) is RetryDecision.BODY_NOT_REPLAYABLE
    assert decide(CONNECT, method="POST", body_replayable=False) is (
        RetryDecision.BODY_NOT_REPLAYABLE
    )


def test_no_retry_once_the_response_started() -> None:
    assert decide(Attempt.response(503), response_started=True) is RetryDecision.RESPONSE_STARTED


def test_server_waits_longer_than_retry_after_max_return_the_response() -> None:
    long_wait = Attempt.response(503, retry_after=120.0)
    assert decide(long_wait, wait=120.0) is RetryDecision.SERVER_WAIT_TOO_LONG
    assert decide(Attempt.response(503, retry_after=60.0), wait=60.0) is RetryDecision.RETRY
    ignored = replace(POLICY, retry_after=RetryAfterPolicy(honor=False, max=60.0))
    assert decide(long_wait, ignored, wait=0.5) is RetryDecision.RETRY


def test_a_wait_that_uses_up_the_time_left_is_not_taken() -> None:
    assert decide(Attempt.response(503), time_left=2.0, wait=2.0) is RetryDecision.DEADLINE
    assert decide(Attempt.response(503), time_left=2.0, wait=1.9) is RetryDecision.RETRY
    assert decide(Attempt.response(503), time_left=None, wait=50.0) is RetryDecision.RETRY


def test_retry_wait_honours_the_server_only_when_longer_and_enabled() -> None:
    assert retry_wait(POLICY, Attempt.response(503, retry_after=5.0), 1.0) == 5.0
    assert retry_wait(POLICY, Attempt.response(503, retry_after=0.2), 1.0) == 1.0
    assert retry_wait(POLICY, Attempt.response(503), 1.0) == 1.0
    off = replace(POLICY, retry_after=RetryAfterPolicy(honor=False))
    assert retry_wait(off, Attempt.response(503, retry_after=5.0), 1.0) == 1.0

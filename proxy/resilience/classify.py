"""What one attempt came to, and whether the retry stage may try again.

Two questions are kept apart, as in Envoy: `retry_reason` asks "is this outcome of a
retriable kind?" (pure classification against `retry.on`), `decide_retry` asks "should
we retry *now*?" and answers with a `RetryDecision` whose value says why not. The retry
budget is consulted by the caller only after `decide_retry` said RETRY, so a retry that
would be refused anyway never spends budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.config.model import FailoverPolicy, RetryOn, RetryPolicy

__all__ = [
    "Attempt",
    "AttemptResult",
    "RetryDecision",
    "decide_failover",
    "decide_retry",
    "failover_reason",
    "result_for_status",
    "retry_reason",
    "retry_wait",
]


class AttemptResult(StrEnum):
    """How an attempt ended; the values are the `upstream_attempts_total{result}` labels."""

    OK = "ok"  # response headers arrived with a status that is not an error
    STATUS = "status"  # response headers arrived with a 5xx or 429
    TIMEOUT = "timeout"  # the attempt timeout fired before the response headers
    CONNECT_FAILURE = "connect-failure"  # no connection could be made (DNS, refused, TLS)
    RESET = "reset"  # the connection broke before the response headers arrived


def result_for_status(status: int) -> AttemptResult:
    """The metric label for an attempt that got a response: `status` for 5xx and 429
    (the statuses that signal an unhealthy or throttling upstream), else `ok`. Retry and
    breaker decisions do not use this label: they match the status against their policy."""
    return AttemptResult.STATUS if status >= 500 or status == 429 else AttemptResult.OK


@dataclass(slots=True)
class Attempt:
    """The outcome of one upstream attempt, as the breaker and the retry stage see it.

    `status` is set when response headers arrived. `reset_before_request` is true when the
    connection failed before any byte of the request was written (a stale pooled
    connection), which makes a retry safe for any method. `duration` is seconds from the
    attempt's start to its response headers or failure. `retry_after` is the server's
    requested wait in seconds (see `backoff.server_wait`), or None.

    Not frozen (nothing changes one once made): a frozen dataclass pays a
    `object.__setattr__` per field, and one is made for every proxied request.
    """

    result: AttemptResult
    status: int | None = None
    reset_before_request: bool = False
    duration: float = 0.0
    retry_after: float | None = None

    @classmethod
    def response(
        cls, status: int, duration: float = 0.0, retry_after: float | None = None
    ) -> Attempt:
        """An attempt that received response headers."""
        return cls(result_for_status(status), status, False, duration, retry_after)

    @property
    def nothing_sent(self) -> bool:
        """True when the upstream cannot have seen the request (safe to replay for any method)."""
        return self.result == AttemptResult.CONNECT_FAILURE or (
            self.result == AttemptResult.RESET and self.reset_before_request
        )


def retry_reason(on: RetryOn, outcome: Attempt) -> str | None:
    """The `retry.on` token this outcome matches (the `retries_total{reason}` label), or None.

    Transport conditions match their own token; a response matches by status, labelled by
    the first `on` token containing it as the YAML spelled it (`5xx`, `503`, `gateway-error`).
    """
    result = outcome.result
    if result == AttemptResult.CONNECT_FAILURE:
        return "connect-failure" if on.connect_failure else None
    if result == AttemptResult.RESET:
        return "reset" if on.reset else None
    if result == AttemptResult.TIMEOUT:
        return "timeout" if on.timeout else None
    if outcome.status is not None and outcome.status in on.statuses:
        return on.statuses.label_for(outcome.status)
    return None


def retry_wait(policy: RetryPolicy, outcome: Attempt, backoff: float) -> float:
    """Seconds to wait before the next attempt: the backoff, or the server's requested wait
    when `retry_after.honor` is on and it is longer (never earlier than the server asked)."""
    if policy.retry_after.honor and outcome.retry_after is not None:
        return max(backoff, outcome.retry_after)
    return backoff


class RetryDecision(StrEnum):
    """Whether to retry, and if not, why not (usable as a log field or metric label)."""

    RETRY = "retry"
    NOT_RETRIABLE = "not-retriable"  # the outcome matches nothing in `retry.on`
    RESPONSE_STARTED = "response-started"  # bytes already went to the client
    ATTEMPTS_EXHAUSTED = "attempts-exhausted"  # `max_attempts` reached
    METHOD = "method"  # not an idempotent method, no idempotency header, and sent
    BODY_NOT_REPLAYABLE = "body-not-replayable"  # streamed (over `max_body`) and consumed
    SERVER_WAIT_TOO_LONG = "server-wait-too-long"  # server asked for more than retry_after.max
    DEADLINE = "deadline"  # the wait would use up the time left
    BUDGET_EXHAUSTED = "budget-exhausted"  # set by the caller when the budget refused


def decide_retry(
    policy: RetryPolicy,
    outcome: Attempt,
    *,
    method: str,
    has_idempotency_key: bool,
    attempt: int,
    body_replayable: bool,
    time_left: float | None,
    wait: float,
    response_started: bool = False,
) -> RetryDecision:
    """Apply the retry rules of DESIGN §6 to one finished attempt, budget excepted.

    `attempt` is the number of attempts made so far (1 after the first). `method` is
    upper-case; `has_idempotency_key` says the request carries `policy.idempotency_header`.
    Connect failures and resets before anything was written are retried for any method;
    other outcomes need the method in `policy.methods` or the idempotency header.
    `wait` is the planned wait (see `retry_wait`), `time_left` the seconds left of the
    total timeout (None: unbounded); a retry is pointless when the wait uses it all.
    When several rules refuse, the first in the order of `RetryDecision` is reported.
    """
    if retry_reason(policy.on, outcome) is None:
        return RetryDecision.NOT_RETRIABLE
    if response_started:
        return RetryDecision.RESPONSE_STARTED
    if attempt >= policy.max_attempts:
        return RetryDecision.ATTEMPTS_EXHAUSTED
    if not outcome.nothing_sent and method not in policy.methods:
        if not (has_idempotency_key and policy.idempotency_header is not None):
            return RetryDecision.METHOD
    if not body_replayable:
        return RetryDecision.BODY_NOT_REPLAYABLE
    if (
        policy.retry_after.honor
        and outcome.retry_after is not None
        and outcome.retry_after > policy.retry_after.max
    ):
        return RetryDecision.SERVER_WAIT_TOO_LONG
    if time_left is not None and wait >= time_left:
        return RetryDecision.DEADLINE
    return RetryDecision.RETRY


def failover_reason(policy: FailoverPolicy, outcome: Attempt) -> str | None:
    """The `failover.on` token this finished attempt matches (the `failovers_total{reason}`
    label), or None. The refusals (`breaker-open`, `quota`) send nothing and are matched by
    the failover stage before any attempt."""
    result = outcome.result
    if result == AttemptResult.OK or result == AttemptResult.STATUS:
        if outcome.status is not None and outcome.status in policy.statuses:
            return policy.statuses.label_for(outcome.status)
        return None
    return result.value if result.value in policy.conditions else None


def decide_failover(
    outcome: Attempt,
    *,
    methods: frozenset[str],
    idempotency_header: str | None,
    method: str,
    has_idempotency_key: bool,
    attempt: int,
    max_attempts: int | None,
    body_replayable: bool,
    time_left: float | None,
) -> RetryDecision:
    """May the next attempt go to the next target, at once (DESIGN §16)?

    The same rules as a retry, without a wait: never after a response byte went to the
    client (the pipeline returns before any is sent), never with a body that cannot be
    replayed; other methods than `methods` only with the idempotency header or when nothing
    was sent (connect-failure); `max_attempts` (None: one per target) bounds the attempts.
    """
    if max_attempts is not None and attempt >= max_attempts:
        return RetryDecision.ATTEMPTS_EXHAUSTED
    if not outcome.nothing_sent and method not in methods:
        if not (has_idempotency_key and idempotency_header is not None):
            return RetryDecision.METHOD
    if not body_replayable:
        return RetryDecision.BODY_NOT_REPLAYABLE
    if time_left is not None and time_left <= 0:
        return RetryDecision.DEADLINE
    return RetryDecision.RETRY

"""Retry stage: repeats attempts per the route's RetryPolicy, spending its retry budget.

The pure rules (which outcomes match `on`, which methods and bodies may be replayed, how
long to wait) live in `proxy.resilience`; this stage only loops, sleeps and records.
Rejections by the breaker or the bulkhead are never retried. On a failover route, an
outcome the failover stage marked (`Result.failover`) is a hop to the next target: taken
at once, without backoff, under the same rules, and counted as a retry in the budget.
"""

from __future__ import annotations

from proxy.clock import Clock, Rng
from proxy.config.model import RetryPolicy
from proxy.observe.events import EventBus, RetryScheduled
from proxy.resilience.backoff import backoff_delay
from proxy.resilience.budget import RetryBudget
from proxy.resilience.classify import (
    AttemptResult,
    RetryDecision,
    decide_failover,
    decide_retry,
    retry_reason,
    retry_wait,
)
from proxy.stages.call import Call, Result, Stage

_NEVER_RETRIED = frozenset(("breaker-open", "bulkhead-full"))
_REFUSALS = frozenset(("breaker-open", "quota"))  # nothing was sent


class RetryStage(Stage):
    __slots__ = ("budget", "bus", "clock", "policy", "rng", "route", "statuses")

    def __init__(
        self,
        next_stage: Stage,
        route: str,
        policy: RetryPolicy,
        budget: RetryBudget,
        clock: Clock,
        rng: Rng,
        bus: EventBus,
    ) -> None:
        super().__init__(next_stage)
        self.route = route
        self.policy = policy
        self.budget = budget
        self.clock = clock
        self.rng = rng
        self.bus = bus
        self.statuses = policy.on.statuses.statuses  # the `on` statuses, as a frozenset

    async def __call__(self, call: Call) -> Result:
        policy = self.policy
        self.budget.record_request()
        attempt = 1
        assert self.next is not None
        while True:
            result = await self.next(call)
            outcome = result.attempt
            if (
                outcome is not None
                and outcome.result is AttemptResult.OK
                and result.failover is None
                and outcome.status not in self.statuses
            ):
                return result  # the common case: an answer `on` does not name
            if outcome is None or result.failure in _NEVER_RETRIED or result.total_timeout:
                if outcome is None and attempt > 1 and result.failure in _REFUSALS:
                    # The retry was refused before anything was sent (the breaker opened
                    # during the backoff): it costs no budget and is not counted.
                    self.budget.release()
                    call.record.retries.pop()
                return result
            reason = result.failover
            if reason is not None:
                wait = 0.0
                time_left = None if call.deadline is None else call.deadline - self.clock.now()
                decision = decide_failover(
                    outcome,
                    methods=policy.methods,
                    idempotency_header=policy.idempotency_header,
                    method=call.method,
                    has_idempotency_key=call.has_idempotency_key,
                    attempt=attempt,
                    max_attempts=policy.max_attempts,
                    body_replayable=call.body.replayable,
                    time_left=time_left,
                )
            else:
                reason = retry_reason(policy.on, outcome)
                if reason is None:
                    return result
                backoff = backoff_delay(policy.backoff, attempt, self.rng)
                wait = retry_wait(policy, outcome, backoff)
                time_left = None if call.deadline is None else call.deadline - self.clock.now()
                decision = decide_retry(
                    policy,
                    outcome,
                    method=call.method,
                    has_idempotency_key=call.has_idempotency_key,
                    attempt=attempt,
                    body_replayable=call.body.replayable,
                    time_left=time_left,
                    wait=wait,
                )
            if decision is not RetryDecision.RETRY:
                return result
            if not self.budget.try_acquire():
                call.record.budget_exhausted = True
                return result
            result.discard()
            attempt += 1
            call.record.retries.append(reason)
            self.bus.emit(RetryScheduled(self.route, attempt, reason, wait))
            if result.failover is None:  # a hop to the next target goes at once
                await self.clock.sleep(wait)

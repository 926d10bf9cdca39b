"""Failover stage: picks the target of each attempt of a route with `failover` (DESIGN §16).

Targets are the route's upstream (the primary), then `failover.upstreams` in order; each
has its own chain (quota → breaker → bulkhead → attempt). Counting:

- An attempt goes to the first target, from the current one on, whose breaker (and quota)
  admit it, when `failover.on` lists that refusal; a refused target costs no attempt and no
  budget (nothing was sent).
- After a failed attempt whose outcome `failover.on` lists, the next attempt may go to the
  next target at once. With a retry stage outside, this stage marks the result
  (`Result.failover`) and the retry stage decides (method, body, attempts, budget) and
  counts the hop as a retry without backoff; an outcome only `retry.on` lists is retried
  on the same target with backoff. Without a retry block this stage walks the targets
  itself, one attempt each.

Every request starts at the primary, so when the primary's breaker grants a half-open
trial permit the next request is that trial, and traffic returns as soon as it recovers.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.clock import Clock
from proxy.config.model import FailoverPolicy, RetryPolicy
from proxy.observe.events import EventBus, FailedOver
from proxy.resilience.classify import RetryDecision, decide_failover, failover_reason
from proxy.stages.call import Call, Result, Stage

# Refusals of a target's own stages: nothing was sent, so skipping it costs nothing.
_REFUSALS = frozenset(("breaker-open", "quota"))


class Serving:
    """Which target of a route answered last (for `/status`); kept across reloads."""

    __slots__ = ("upstream",)

    def __init__(self) -> None:
        self.upstream: str | None = None


class FailoverStage(Stage):
    __slots__ = (
        "admits",
        "bus",
        "chains",
        "clock",
        "idempotency_header",
        "max_attempts",
        "methods",
        "names",
        "policy",
        "route",
        "serving",
        "walks",
    )

    def __init__(
        self,
        chains: tuple[Stage, ...],
        names: tuple[str, ...],
        route: str,
        policy: FailoverPolicy,
        retry: RetryPolicy | None,
        clock: Clock,
        bus: EventBus,
        serving: Serving,
        admits: tuple[Callable[[], bool], ...] | None = None,
        *,
        walks: bool | None = None,
    ) -> None:
        super().__init__(chains[0])
        self.chains = chains
        # Per target: whether its breaker (and quota) would admit an attempt now, asked
        # without taking anything; None: every target admits (no breakers).
        self.admits = admits
        self.names = names
        self.route = route
        self.policy = policy
        # Without a retry stage outside (no retry block, or max_attempts: 1), this stage
        # takes the hops itself: one attempt per target, within retry.max_attempts if set.
        self.walks = retry is None if walks is None else walks
        rules = retry or RetryPolicy()
        self.methods = rules.methods
        self.idempotency_header = rules.idempotency_header
        self.max_attempts = retry.max_attempts if retry is not None else None
        self.clock = clock
        self.bus = bus
        self.serving = serving

    async def __call__(self, call: Call) -> Result:
        if not self.walks:
            return await self.attempt(call)
        attempts = 0
        while True:
            result = await self.attempt(call)
            if result.attempt is not None:
                attempts += 1
            if result.failover is None:
                return result
            assert result.attempt is not None
            time_left = None if call.deadline is None else call.deadline - self.clock.now()
            decision = decide_failover(
                result.attempt,
                methods=self.methods,
                idempotency_header=self.idempotency_header,
                method=call.method,
                has_idempotency_key=call.has_idempotency_key,
                attempt=attempts,
                max_attempts=self.max_attempts,
                body_replayable=call.body.replayable,
                time_left=time_left,
            )
            if decision is not RetryDecision.RETRY:
                call.hop = None
                return result
            result.discard()

    async def attempt(self, call: Call) -> Result:
        """One attempt, at the current target or the first one after it that admits it."""
        record = call.record
        chains = self.chains
        last = len(chains) - 1
        hop = call.hop
        if hop is not None:
            call.hop = None
            index, reason = hop
            self._moved(record.target, index, reason)
        else:
            index = record.target
        refused: Result | None = None
        while True:
            record.target = index
            result = await chains[index](call)
            failure = result.failure
            if result.attempt is None and failure in _REFUSALS:
                if refused is not None and refused.retry_after is not None:
                    if result.retry_after is None or refused.retry_after < result.retry_after:
                        result.retry_after = refused.retry_after  # the soonest any admits
                if index < last and failure in self.policy.conditions:
                    assert failure is not None
                    refused = result
                    self._moved(index, index + 1, failure)
                    index += 1
                    continue
                return result
            break
        outcome = result.attempt
        if outcome is not None and not result.total_timeout and index < last:
            why = failover_reason(self.policy, outcome)
            if why is not None and self._reachable(index + 1):
                result.failover = why
                call.hop = (index + 1, why)
                return result
        if outcome is not None and outcome.status is not None:  # this target answered
            self.serving.upstream = self.names[index]
        return result

    def _reachable(self, start: int) -> bool:
        """Would an attempt starting at target `start` be sent somewhere? Not when every
        target from there on refuses (or the first refusal is not one `on` skips): then the
        failed answer in hand is returned rather than traded for a refusal."""
        admits = self.admits
        if admits is None:
            return True
        skips = "breaker-open" in self.policy.conditions
        for index in range(start, len(admits)):
            if admits[index]():
                return True
            if not skips:
                return False
        return False

    def _moved(self, source: int, target: int, reason: str) -> None:
        self.bus.emit(FailedOver(self.route, self.names[source], self.names[target], reason))

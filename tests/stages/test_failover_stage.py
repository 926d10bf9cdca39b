"""Target selection and counting of the failover stage (DESIGN §16), on a fake clock with
scripted target chains; with and without the retry stage outside it. Nothing sleeps."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.model import (
    BackoffPolicy,
    BreakerPolicy,
    BudgetPolicy,
    FailoverPolicy,
    RetryOn,
    RetryPolicy,
    StatusSet,
)
from proxy.observe.events import EventBus, FailedOver, RetryScheduled
from proxy.observe.metrics import RequestRecord
from proxy.resilience.breaker import Breaker, BreakerState
from proxy.resilience.budget import RetryBudget
from proxy.resilience.classify import Attempt, AttemptResult
from proxy.stages.breaker import BreakerStage
from proxy.stages.call import Call, RequestBody, Result, Stage
from proxy.stages.failover import FailoverStage, Serving
from proxy.stages.retry import RetryStage

NAMES = ("a", "b", "c")


class InstantClock(FakeClock):
    """Sleep moves time forward at once and remembers each wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.advance(seconds)


class MaxRng:
    def uniform(self, low: float, high: float) -> float:
        return high


class Scripted(Stage):
    """One target's chain: answers from a script, then a default."""

    def __init__(self, *outcomes: Result, default: Result | None = None) -> None:
        super().__init__(None)
        self.outcomes = deque(outcomes)
        self.default = default
        self.calls = 0

    async def __call__(self, call: Call) -> Result:
        self.calls += 1
        if self.outcomes:
            return self.outcomes.popleft()
        assert self.default is not None, "this target was not expected to be called"
        return _copy(self.default)


def _copy(result: Result) -> Result:
    copy = Result(failure=result.failure, retry_after=result.retry_after)
    copy.attempt = result.attempt
    return copy


def status(code: int) -> Result:
    result = Result(failure=None)
    result.attempt = Attempt.response(code, 0.01)
    return result


def failure(kind: str, before: bool = False) -> Result:
    result = Result(failure=kind)
    result.attempt = Attempt(AttemptResult(kind), None, before, 0.01)
    return result


def refused(retry_after: float = 30.0) -> Result:
    return Result(failure="breaker-open", retry_after=retry_after)


FAILOVER = FailoverPolicy(upstreams=())  # default on: transports, refusals, 5xx
RETRY = RetryPolicy(
    max_attempts=5,
    backoff=BackoffPolicy(initial=0.1, max=1.0, multiplier=2, jitter="none"),
    budget=BudgetPolicy(ratio=1.0, min_per_second=100, window=10),
)


class Harness:
    def __init__(
        self,
        *chains: Stage,
        policy: FailoverPolicy = FAILOVER,
        retry: RetryPolicy | None = None,
        clock: InstantClock | None = None,
        admits: tuple[Callable[[], bool], ...] | None = None,
    ) -> None:
        self.clock = clock or InstantClock()
        self.events: list[object] = []
        bus = EventBus()
        bus.subscribe(self.events.append)
        self.serving = Serving()
        names = NAMES[: len(chains)]
        self.stage: Stage = FailoverStage(
            tuple(chains), names, "r", policy, retry, self.clock, bus, self.serving, admits
        )
        self.budget: RetryBudget | None = None
        if retry is not None:
            self.budget = RetryBudget(retry.budget, self.clock)
            self.stage = RetryStage(self.stage, "r", retry, self.budget, self.clock, MaxRng(), bus)

    async def __call__(self, call: Call) -> Result:
        return await self.stage(call)

    def moves(self) -> list[tuple[str, str, str]]:
        return [
            (e.from_upstream, e.to_upstream, e.reason)
            for e in self.events
            if isinstance(e, FailedOver)
        ]


def call(method: str = "GET", body: RequestBody | None = None, key: bool = False) -> Call:
    c = Call(method, "/x", CIMultiDict, CIMultiDict(), body or RequestBody(b""),
             RequestRecord(method), None)
    c.has_idempotency_key = key
    return c


# --- without a retry block: each target gets one attempt -----------------------------------


async def test_a_failed_primary_hands_the_request_to_the_secondary_at_once():
    a, b = Scripted(failure("connect-failure", before=True)), Scripted(status(200))
    h = Harness(a, b)
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert (a.calls, b.calls) == (1, 1)
    assert h.clock.waits == []  # no backoff between targets
    assert c.record.target == 1 and h.serving.upstream == "b"
    assert h.moves() == [("a", "b", "connect-failure")]


async def test_each_target_gets_one_attempt_then_the_last_answer_is_returned():
    a, b, c3 = Scripted(status(503)), Scripted(failure("reset")), Scripted(status(502))
    h = Harness(a, b, c3)
    result = await h(call())
    assert (a.calls, b.calls, c3.calls) == (1, 1, 1)
    assert result.attempt is not None and result.attempt.status == 502
    assert h.moves() == [("a", "b", "5xx"), ("b", "c", "reset")]


async def test_max_attempts_one_without_a_retry_stage_allows_no_hop():
    down = failure("connect-failure", before=True)
    a, b = Scripted(down), Scripted()
    clock = InstantClock()
    stage = FailoverStage((a, b), ("a", "b"), "r", FAILOVER, RetryPolicy(max_attempts=1),
                          clock, EventBus(), Serving(), walks=True)
    result = await stage(call())
    assert result.failure == "connect-failure" and b.calls == 0


async def test_an_outcome_not_in_failover_on_is_returned():
    policy = FailoverPolicy((), frozenset({"connect-failure"}), StatusSet())
    a, b = Scripted(status(503)), Scripted()
    h = Harness(a, b, policy=policy)
    result = await h(call())
    assert result.attempt is not None and result.attempt.status == 503
    assert b.calls == 0 and h.moves() == []


async def test_a_refused_target_is_skipped_without_an_attempt():
    a, b = Scripted(refused()), Scripted(status(200))
    h = Harness(a, b)
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert h.moves() == [("a", "b", "breaker-open")]
    assert c.record.target == 1


async def test_a_refusal_not_in_on_is_the_answer():
    policy = FailoverPolicy((), frozenset({"connect-failure"}), StatusSet(("5xx",), frozenset(range(500, 600))))
    a, b = Scripted(refused()), Scripted()
    h = Harness(a, b, policy=policy)
    result = await h(call())
    assert result.failure == "breaker-open" and b.calls == 0


async def test_every_target_refusing_answers_breaker_open_with_the_soonest_retry_after():
    a, b, c3 = Scripted(refused(40)), Scripted(refused(5)), Scripted(refused(20))
    h = Harness(a, b, c3)
    result = await h(call())
    assert result.failure == "breaker-open" and result.attempt is None
    assert result.retry_after == 5
    assert h.moves() == [("a", "b", "breaker-open"), ("b", "c", "breaker-open")]


async def test_a_post_is_failed_over_only_when_nothing_was_sent_or_with_the_key():
    # sent and answered 503: the provider may have acted on it
    a, b = Scripted(status(503)), Scripted()
    assert (await Harness(a, b)(call("POST", RequestBody(b"{}")))).attempt.status == 503  # type: ignore[union-attr]
    assert b.calls == 0
    # connection refused: nothing was sent, safe for any method
    a, b = Scripted(failure("connect-failure", before=True)), Scripted(status(200))
    assert (await Harness(a, b)(call("POST", RequestBody(b"{}")))).attempt.status == 200  # type: ignore[union-attr]
    # the idempotency header makes a sent POST safe to repeat elsewhere
    a, b = Scripted(status(503)), Scripted(status(200))
    assert (await Harness(a, b)(call("POST", RequestBody(b"{}"), key=True))).attempt.status == 200  # type: ignore[union-attr]


async def test_a_body_that_cannot_be_replayed_is_never_failed_over():
    class Once:
        async def readany(self) -> bytes:
            return b""

    body = RequestBody(None, Once())
    body.consumed = True  # the first attempt streamed it
    a, b = Scripted(failure("reset")), Scripted()
    result = await Harness(a, b)(call("PUT", body))
    assert result.failure == "reset" and b.calls == 0


async def test_a_total_timeout_is_never_failed_over():
    timed_out = failure("timeout")
    timed_out.total_timeout = True
    a, b = Scripted(timed_out), Scripted()
    result = await Harness(a, b)(call())
    assert result.total_timeout and b.calls == 0


# --- with a retry block: hops count as retries, retry.on retries the same target --------


async def test_a_hop_goes_at_once_and_counts_as_a_retry():
    a, b = Scripted(status(503)), Scripted(status(200))
    h = Harness(a, b, retry=RETRY)
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert h.clock.waits == []  # no backoff before the next target
    assert c.record.retries == ["5xx"]  # default failover.on labels the hop by its token
    assert h.moves() == [("a", "b", "5xx")]


async def test_a_condition_only_in_retry_on_retries_the_same_target_with_backoff():
    policy = FailoverPolicy((), frozenset({"connect-failure"}), StatusSet())
    a, b = Scripted(status(503), status(200)), Scripted()
    h = Harness(a, b, policy=policy, retry=RETRY)
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert (a.calls, b.calls) == (2, 0)
    assert h.clock.waits == [0.1] and h.moves() == []


async def test_a_retry_after_a_skip_stays_on_the_target_that_took_the_attempt():
    policy = FailoverPolicy((), frozenset({"breaker-open"}), StatusSet())
    a = Scripted(refused(), refused())
    b = Scripted(status(503), status(200))
    h = Harness(a, b, policy=policy, retry=RETRY)
    result = await h(call())
    assert result.attempt is not None and result.attempt.status == 200
    # each attempt starts at the current target (b): a is not asked again within the request
    assert (a.calls, b.calls) == (1, 2)
    assert h.clock.waits == [0.1]


async def test_the_last_target_falls_back_to_the_retry_rules():
    a, b = Scripted(status(503)), Scripted(status(503), status(200))
    h = Harness(a, b, retry=RETRY)
    result = await h(call())
    assert result.attempt is not None and result.attempt.status == 200
    assert (a.calls, b.calls) == (1, 2)
    assert h.clock.waits == [0.2]  # the second retry's backoff: initial × 2


async def test_max_attempts_bounds_the_attempts_over_all_targets():
    retry = RetryPolicy(max_attempts=2, budget=RETRY.budget, backoff=RETRY.backoff)
    down = failure("connect-failure", before=True)
    a, b, c3 = Scripted(down), Scripted(_copy(down)), Scripted()
    h = Harness(a, b, c3, retry=retry)
    c = call()
    result = await h(c)
    assert result.failure == "connect-failure"
    assert (a.calls, b.calls, c3.calls) == (1, 1, 0)
    assert len(c.record.retries) == 1


async def test_a_refused_target_costs_no_attempt_and_no_budget():
    # one retry in the whole budget, two attempts allowed: the skip of `a` must cost neither
    retry = RetryPolicy(
        max_attempts=2,
        backoff=RETRY.backoff,
        budget=BudgetPolicy(ratio=0.0, min_per_second=0.1, window=10),
    )
    a, b, c3 = Scripted(refused()), Scripted(status(503)), Scripted(status(200))
    h = Harness(a, b, c3, retry=retry)
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert (a.calls, b.calls, c3.calls) == (1, 1, 1)
    assert c.record.retries == ["5xx"] and not c.record.budget_exhausted
    assert h.moves() == [("a", "b", "breaker-open"), ("b", "c", "5xx")]


async def test_an_exhausted_budget_stops_the_hop():
    retry = RetryPolicy(
        max_attempts=3,
        backoff=RETRY.backoff,
        budget=BudgetPolicy(ratio=0.0, min_per_second=0.1, window=10),
    )
    h = Harness(Scripted(default=status(503)), Scripted(default=status(503)), retry=retry)
    first = call()
    await h(first)
    assert first.record.retries == ["5xx"]  # the one retry the budget holds
    second = call()
    result = await h(second)
    assert result.attempt is not None and result.attempt.status == 503
    assert second.record.budget_exhausted and second.record.retries == []


async def test_retry_on_only_conditions_are_not_failed_over_for_a_post():
    on = RetryOn(statuses=StatusSet(("503",), frozenset((503,))), tokens=("503",))
    retry = RetryPolicy(max_attempts=3, on=on, budget=RETRY.budget, backoff=RETRY.backoff)
    a, b = Scripted(status(503)), Scripted()
    result = await Harness(a, b, retry=retry)(call("POST", RequestBody(b"x")))
    assert result.attempt is not None and result.attempt.status == 503
    assert (a.calls, b.calls) == (1, 0)


async def test_no_hop_is_made_to_a_target_that_would_refuse():
    # b's breaker is open: without a retry block the 503 in hand is the answer, not a
    # breaker-open one; with one, the retry rules apply to the current target
    a, b = Scripted(status(503)), Scripted()
    h = Harness(a, b, admits=(lambda: True, lambda: False))
    result = await h(call())
    assert result.attempt is not None and result.attempt.status == 503
    assert b.calls == 0 and h.moves() == []
    a, b = Scripted(status(503), status(200)), Scripted()
    h = Harness(a, b, retry=RETRY, admits=(lambda: True, lambda: False))
    c = call()
    result = await h(c)
    assert result.attempt is not None and result.attempt.status == 200
    assert (a.calls, b.calls) == (2, 0) and h.moves() == []
    assert c.record.retries == ["503"] and h.clock.waits == [0.1]


async def test_a_retry_refused_after_its_backoff_gives_its_budget_back():
    policy = FailoverPolicy((), frozenset({"connect-failure"}), StatusSet())
    a, b = Scripted(status(503), refused()), Scripted()
    h = Harness(a, b, policy=policy, retry=RETRY)
    c = call()
    result = await h(c)
    assert result.failure == "breaker-open"
    assert h.clock.waits == [0.1]  # it waited, then the breaker had opened
    assert c.record.retries == [] and h.budget is not None and h.budget.retries == 0


# --- with real breakers: half-open trials of the primary while on the secondary -------------


class Answer(Stage):
    """A target that answers with a fixed status, and counts what reached it."""

    def __init__(self, code: int) -> None:
        super().__init__(None)
        self.code = code
        self.calls = 0

    async def __call__(self, call: Call) -> Result:
        self.calls += 1
        return status(self.code)


async def test_half_open_trials_of_the_primary_continue_and_traffic_returns():
    clock = InstantClock()
    policy = BreakerPolicy(
        consecutive_failures=2, failure_rate=None, open_for=10.0, half_open_calls=1
    )
    primary, secondary = Answer(503), Answer(200)
    breaker = Breaker("r", "a", policy, clock)
    chains = (
        BreakerStage(primary, breaker),
        BreakerStage(secondary, Breaker("r", "b", policy, clock)),
    )
    h = Harness(*chains, clock=clock)
    for _ in range(2):
        await h(call())  # two 503s trip the primary; each request was served by b
    assert breaker.state is BreakerState.OPEN and primary.calls == 2
    for _ in range(5):  # while open: nothing reaches the primary
        result = await h(call())
        assert result.attempt is not None and result.attempt.status == 200
    assert primary.calls == 2 and h.serving.upstream == "b"
    clock.advance(10.0)
    primary.code = 200  # it recovered
    c = call()
    await h(c)  # the next request is the trial, and it goes to the primary
    assert primary.calls == 3 and c.record.target == 0
    assert breaker.state is BreakerState.CLOSED and h.serving.upstream == "a"
    before = secondary.calls
    await h(call())
    assert secondary.calls == before and primary.calls == 4


# --- properties: the counting holds for any mix of outcomes ---------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OUTCOMES = ("ok", "503", "500", "connect-failure", "reset", "refused")


def outcome(kind: str) -> Result:
    if kind == "ok":
        return status(200)
    if kind in ("503", "500"):
        return status(int(kind))
    if kind == "refused":
        return refused()
    return failure(kind, before=kind == "connect-failure")


class Recording(Scripted):
    """A scripted target that logs (its index, whether an attempt was made) per call, and
    says whether its next answer is a refusal (what a breaker's `admits` tells)."""

    def __init__(self, index: int, log: list[tuple[int, bool]], kinds: list[str]) -> None:
        super().__init__(*(outcome(k) for k in kinds), default=status(200))
        self.index = index
        self.log = log

    def admits(self) -> bool:
        return not (self.outcomes and self.outcomes[0].failure == "breaker-open")

    async def __call__(self, call: Call) -> Result:
        result = await super().__call__(call)
        self.log.append((self.index, result.attempt is not None))
        return result


@settings(max_examples=150, deadline=None)
@given(
    scripts=st.lists(st.lists(st.sampled_from(OUTCOMES), max_size=4), min_size=2, max_size=3),
    max_attempts=st.integers(min_value=2, max_value=6),
    with_retry=st.booleans(),
)
async def test_attempts_budget_and_waits_add_up_for_any_outcomes(
    scripts: list[list[str]], max_attempts: int, with_retry: bool
) -> None:
    log: list[tuple[int, bool]] = []
    chains = [Recording(i, log, kinds) for i, kinds in enumerate(scripts)]
    retry = None
    if with_retry:
        retry = RetryPolicy(max_attempts=max_attempts, backoff=RETRY.backoff, budget=RETRY.budget,
                            on=RetryOn(statuses=StatusSet(("503",), frozenset((503,))),
                                       tokens=("connect-failure", "reset", "timeout", "503")))
    h = Harness(*chains, retry=retry, admits=tuple(chain.admits for chain in chains))
    c = call()
    await h(c)
    attempts = [index for index, sent in log if sent]
    targets = [index for index, _ in log]
    assert targets == sorted(targets)  # never back to an earlier target within a request
    assert len(c.record.attempts) == 0  # scripted chains record nothing themselves
    hops = [m for m in h.moves() if m[2] not in ("breaker-open", "quota")]
    if with_retry:
        assert len(attempts) <= max_attempts
        # every attempt after the first is a retry, hop or not; refusals are not counted
        assert len(c.record.retries) == max(0, len(attempts) - 1)
        # only same-target retries wait; a hop to the next target goes at once (a retry
        # that waited and was then refused by the breaker is scheduled but not counted)
        scheduled = [e for e in h.events if isinstance(e, RetryScheduled)]
        assert len(h.clock.waits) == len(scheduled) - len(hops)
        assert h.budget is not None and h.budget.retries == len(c.record.retries)
    else:
        assert len(attempts) <= len(chains)
        assert len(set(attempts)) == len(attempts)  # one attempt per target
        assert h.clock.waits == [] and c.record.retries == []

"""The retry stage on a fake clock: which outcomes it repeats, how long it waits, and when
it stops. The inner stage is scripted; nothing sleeps."""

from __future__ import annotations

from collections import deque

from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.model import BackoffPolicy, BudgetPolicy, RetryPolicy
from proxy.observe.events import EventBus, RetryScheduled
from proxy.observe.metrics import RequestRecord
from proxy.resilience.budget import RetryBudget
from proxy.resilience.classify import Attempt, AttemptResult
from proxy.stages.call import Call, RequestBody, Result, Stage
from proxy.stages.retry import RetryStage


class InstantClock(FakeClock):
    """A fake clock whose sleep moves time forward at once, and remembers each wait."""

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
    def __init__(self, *outcomes: Result) -> None:
        super().__init__(None)
        self.outcomes = deque(outcomes)
        self.calls = 0

    async def __call__(self, call: Call) -> Result:
        self.calls += 1
        return self.outcomes.popleft()


def status(code: int, retry_after: float | None = None) -> Result:
    result = Result(failure=None)
    result.attempt = Attempt.response(code, 0.01, retry_after)
    return result


def failure(kind: str, before: bool = False) -> Result:
    result = Result(failure=kind)
    result.attempt = Attempt(AttemptResult(kind), None, before, 0.01)
    return result


POLICY = RetryPolicy(
    max_attempts=4,
    backoff=BackoffPolicy(initial=0.1, max=0.3, multiplier=2, jitter="none"),
    budget=BudgetPolicy(ratio=1.0, min_per_second=100, window=10),
)


def make(inner: Stage, clock: InstantClock, policy: RetryPolicy = POLICY) -> tuple[RetryStage, list]:
    events: list = []
    bus = EventBus()
    bus.subscribe(events.append)
    stage = RetryStage(inner, "r", policy, RetryBudget(policy.budget, clock), clock, MaxRng(), bus)
    return stage, events


def call(method: str = "GET", body: RequestBody | None = None, deadline: float | None = None) -> Call:
    return Call(method, "/x", CIMultiDict, CIMultiDict(), body or RequestBody(b""),
                RequestRecord(method), deadline)


async def test_backoff_grows_to_its_cap_then_the_last_answer_is_returned():
    clock = InstantClock()
    inner = Scripted(status(503), status(503), status(503), status(503))
    stage, events = make(inner, clock)
    result = await stage(call())
    assert inner.calls == 4
    assert result.attempt is not None and result.attempt.status == 503
    assert clock.waits == [0.1, 0.2, 0.3]  # initial × 2^(k-1), capped at max
    assert [e.attempt for e in events if isinstance(e, RetryScheduled)] == [2, 3, 4]


async def test_statuses_not_in_on_are_returned_at_once():
    clock = InstantClock()
    inner = Scripted(status(500))  # default `on` lists 502, 503, 504 only
    stage, _ = make(inner, clock)
    await stage(call())
    assert inner.calls == 1 and clock.waits == []


async def test_server_wait_longer_than_backoff_is_honoured():
    clock = InstantClock()
    inner = Scripted(status(503, retry_after=2.5), status(200))
    stage, _ = make(inner, clock)
    await stage(call())
    assert clock.waits == [2.5]


async def test_no_retry_when_the_wait_outlives_the_deadline():
    clock = InstantClock()
    inner = Scripted(status(503, retry_after=5), status(200))
    stage, _ = make(inner, clock)
    result = await stage(call(deadline=clock.now() + 1.0))
    assert inner.calls == 1 and result.attempt is not None and result.attempt.status == 503


async def test_post_is_retried_only_after_a_connect_failure():
    clock = InstantClock()
    inner = Scripted(failure("connect-failure", before=True), status(503), status(200))
    stage, _ = make(inner, clock)
    result = await stage(call("POST", RequestBody(b"payload")))
    assert inner.calls == 2  # the connect failure is replayed; the POST's 503 is not
    assert result.attempt is not None and result.attempt.status == 503


async def test_breaker_and_bulkhead_rejections_are_never_retried():
    for kind in ("breaker-open", "bulkhead-full"):
        clock = InstantClock()
        inner = Scripted(Result(failure=kind))
        stage, _ = make(inner, clock)
        assert (await stage(call())).failure == kind
        assert inner.calls == 1


async def test_an_exhausted_budget_stops_retries_and_is_recorded():
    clock = InstantClock()
    policy = RetryPolicy(
        max_attempts=3,
        backoff=BackoffPolicy(initial=0.001, max=0.001, jitter="none"),
        budget=BudgetPolicy(ratio=0.0, min_per_second=0.1, window=10),  # one retry per 10 s
    )
    inner = Scripted(status(503), status(503), status(503), status(503))
    stage, _ = make(inner, clock, policy)
    first = call()
    await stage(first)
    assert inner.calls == 2 and first.record.budget_exhausted

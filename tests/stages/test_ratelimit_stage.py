"""The rate-limit stage on a fake clock (DESIGN §14): over any interval T a caller's bucket
admits at most burst + rps × T; one caller over its rate leaves the others alone; a refusal
says when the next token is there and never reaches the inner stage."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.model import RateLimitPolicy
from proxy.observe.metrics import RequestRecord
from proxy.stages.call import Call, RequestBody, Result, Stage
from proxy.stages.ratelimit import RateLimitStage
from proxy.state import LocalBackend
from proxy.state.bucket import LocalBuckets


class Counting(Stage):
    def __init__(self) -> None:
        super().__init__(None)
        self.calls = 0

    async def __call__(self, call: Call) -> Result:
        self.calls += 1
        return Result(failure=None)


def call(agent: str | None = None) -> Call:
    headers = CIMultiDict({"X-Agent-Id": agent} if agent is not None else {})
    return Call("GET", "/x", CIMultiDict, headers, RequestBody(b""), RequestRecord("GET"), None)


def stage(policy: RateLimitPolicy, clock: FakeClock, shared=None):  # type: ignore[no-untyped-def]
    inner = Counting()
    return RateLimitStage(inner, "r", policy, LocalBuckets(policy.max_callers), clock, shared), inner


@settings(max_examples=100, deadline=None)
@given(
    rps=st.floats(min_value=0.2, max_value=200),
    burst=st.integers(min_value=1, max_value=30),
    gaps=st.lists(st.floats(min_value=0, max_value=0.4), min_size=1, max_size=200),
)
def test_any_interval_admits_at_most_burst_plus_rps_times_its_length(rps, burst, gaps):
    async def run() -> list[float]:
        clock = FakeClock(start=0.0)
        limiter, _ = stage(RateLimitPolicy(rps=rps, burst=float(burst)), clock)
        admitted = []
        for gap in gaps:
            clock.advance(gap)
            if (await limiter(call())).failure is None:
                admitted.append(clock.now())
        return admitted

    admitted = asyncio.run(run())
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + rps * (admitted[j] - admitted[i]) + 1e-6


async def test_a_caller_over_its_rate_is_refused_with_the_wait_and_others_are_not():
    clock = FakeClock(start=0.0)
    limiter, inner = stage(RateLimitPolicy(rps=2.0, burst=1.0, per_header="x-agent-id"), clock)
    assert (await limiter(call("a"))).failure is None
    greedy = call("a")
    refused = await limiter(greedy)
    assert refused.failure == "rate-limited" and refused.retry_after == 0.5
    assert greedy.record.rate_limited == "local"
    assert (await limiter(call("b"))).failure is None
    assert (await limiter(call())).failure is None  # no header: the bucket of those without
    assert inner.calls == 3
    clock.advance(0.5)
    assert (await limiter(call("a"))).failure is None


async def test_callers_are_kept_in_a_bounded_lru():
    clock = FakeClock(start=0.0)
    buckets = LocalBuckets(10)
    limiter = RateLimitStage(
        Counting(), "r", RateLimitPolicy(rps=1.0, burst=1.0, per_header="x-agent-id", max_callers=10), buckets, clock
    )
    for i in range(1000):
        await limiter(call(f"agent-{i}"))
    assert len(buckets) == 10


async def test_shared_takes_its_tokens_from_the_state_backend():
    clock = FakeClock(start=0.0)
    backend = LocalBackend(clock)
    policy = RateLimitPolicy(rps=1.0, burst=2.0, shared=True)
    first, _ = stage(policy, clock, backend)
    second, _ = stage(policy, clock, backend)  # another route object, the same backend bucket
    results = [await first(call()), await second(call()), await first(call())]
    assert [r.failure for r in results] == [None, None, "rate-limited"]
    refused = call()
    await second(refused)
    assert refused.record.rate_limited == "shared"

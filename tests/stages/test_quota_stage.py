"""The quota stage on a fake clock: requests wait for the reset in FIFO order, are refused
when the reset is beyond their deadline, and nothing is sent meanwhile. The inner stage is
scripted; nothing sleeps for real."""

from __future__ import annotations

import asyncio
import json

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import FakeClock
from proxy.config.model import BackoffPolicy, BudgetPolicy, QuotaPolicy, RetryPolicy, Upstream
from proxy.observe.events import EventBus
from proxy.observe.metrics import RequestRecord
from proxy.resilience.budget import RetryBudget
from proxy.resilience.classify import Attempt
from proxy.resilience.quota import RESET_MARGIN
from proxy.stages.call import Call, RequestBody, Result, Stage
from proxy.stages.quota import QuotaStage, QuotaState
from proxy.stages.retry import RetryStage

UPSTREAM = Upstream(name="gh", url="http://127.0.0.1:9", scheme="http", host="127.0.0.1:9", base_path="")


class Body:
    """What the handler reads a response body through (already complete)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.content = Body(body)
        self.released = False

    def release(self) -> None:
        self.released = True


class Upstream_(Stage):
    """Answers from a script, and records when each request was sent (fake time)."""

    def __init__(self, clock: FakeClock, script) -> None:  # type: ignore[no-untyped-def]
        super().__init__(None)
        self.clock = clock
        self.script = script
        self.sent: list[tuple[float, str]] = []

    async def __call__(self, call: Call) -> Result:
        self.sent.append((self.clock.now(), call.path_qs))
        response = self.script(len(self.sent), call)
        result = Result(response)
        result.attempt = Attempt.response(response.status, 0.01)
        return result


def make_call(path: str = "/x", deadline: float | None = None, method: str = "GET", headers=None) -> Call:  # type: ignore[no-untyped-def]
    return Call(method, path, CIMultiDict, CIMultiDict(headers or {}), RequestBody(b""), RequestRecord(method), deadline)


GENERIC = QuotaPolicy(headers="generic")


def stage_for(clock: FakeClock, script, policy: QuotaPolicy = GENERIC):  # type: ignore[no-untyped-def]
    inner = Upstream_(clock, script)
    state = QuotaState(UPSTREAM, policy, clock)
    return QuotaStage(inner, state, clock), inner, state


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_waiters_are_released_at_the_reset_in_order_and_nothing_is_sent_before():
    clock = FakeClock(start=0.0)

    def script(n: int, call: Call) -> Response:
        # the first answer says the quota is spent for 30 s
        if n == 1:
            return Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
        return Response(200, {"X-RateLimit-Remaining": "99", "X-RateLimit-Reset": "60"})

    stage, inner, state = stage_for(clock, script)
    first = await stage(make_call("/first", deadline=100.0))
    assert first.response is not None
    tasks = [asyncio.create_task(stage(make_call(f"/q{i}", deadline=100.0))) for i in range(5)]
    await settle()
    assert state.queued == 5 and len(inner.sent) == 1
    clock.advance(29.9)
    await settle()
    assert len(inner.sent) == 1  # nothing goes out before the reset
    clock.advance(0.1 + RESET_MARGIN + 1e-6)
    results = await asyncio.gather(*tasks)
    assert all(r.response is not None for r in results)
    assert [path for _, path in inner.sent[1:]] == [f"/q{i}" for i in range(5)]
    assert all(abs(at - (30.0 + RESET_MARGIN)) < 1e-3 for at, _ in inner.sent[1:])
    assert state.queued == 0


async def test_a_reset_beyond_the_deadline_is_refused_with_retry_after_and_costs_no_attempt():
    clock = FakeClock(start=0.0)
    stage, inner, _ = stage_for(
        clock, lambda n, c: Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    )
    await stage(make_call(deadline=100.0))
    call = make_call(deadline=10.0)
    result = await stage(call)
    assert result.failure == "quota" and result.attempt is None
    assert result.retry_after == 30.0 + RESET_MARGIN
    assert call.record.rate_limited == "quota"
    assert len(inner.sent) == 1


async def test_the_reserve_holds_back_before_zero():
    clock = FakeClock(start=0.0)
    left = iter(range(5, -1, -1))
    stage, inner, _ = stage_for(
        clock,
        lambda n, c: Response(200, {"X-RateLimit-Remaining": str(next(left)), "X-RateLimit-Reset": "30"}),
        QuotaPolicy(headers="generic", reserve=3),
    )
    outcomes = [(await stage(make_call(deadline=5.0))).failure for _ in range(5)]
    # answers 5, 4, 3: the reserve (3) is reached after the third request
    assert outcomes == [None, None, None, "quota", "quota"]
    assert len(inner.sent) == 3


async def test_the_queue_is_bounded_and_a_cancelled_waiter_leaves_it():
    clock = FakeClock(start=0.0)
    stage, inner, state = stage_for(
        clock,
        lambda n, c: Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"}),
        QuotaPolicy(headers="generic", max_queued=2),
    )
    await stage(make_call(deadline=100.0))
    waiting = [asyncio.create_task(stage(make_call(deadline=100.0))) for _ in range(2)]
    await settle()
    refused = await stage(make_call(deadline=100.0))
    assert refused.failure == "quota"
    waiting[0].cancel()
    await settle()
    assert state.queued == 1
    clock.advance(30 + RESET_MARGIN)
    assert (await waiting[1]).response is not None


async def test_a_github_secondary_limit_without_retry_after_pauses_the_partition_for_60s():
    clock = FakeClock(start=0.0)
    body = json.dumps({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."}).encode()

    def script(n: int, call: Call) -> Response:
        if n == 1:
            return Response(403, {"x-ratelimit-remaining": "4990", "x-ratelimit-reset": "9999999999"}, body)
        return Response(200, {"x-ratelimit-remaining": "4989", "x-ratelimit-reset": "9999999999"})

    stage, inner, _ = stage_for(clock, script, QuotaPolicy(headers="github"))
    token = {"Authorization": "token alice"}
    first_call = make_call(headers=token, deadline=500.0)
    first = await stage(first_call)
    assert first.response is not None and first.response.status == 403
    assert first_call.record.rate_limited == "upstream"
    # the body was read to find the message, and is still there for the client
    assert first.response.content.read_nowait() == body
    # another credential partition is not paused
    other = await stage(make_call(headers={"Authorization": "token bob"}, deadline=500.0))
    assert other.response is not None and len(inner.sent) == 2
    # the paused partition: refused when 60 s do not fit, else waits the full 60 s
    short = await stage(make_call(headers=token, deadline=30.0))
    assert short.failure == "quota" and short.retry_after == 60.0
    waiting = asyncio.create_task(stage(make_call(headers=token, deadline=500.0)))
    clock.advance(59.9)
    await settle()
    assert len(inner.sent) == 2  # nothing sent for that partition during the pause
    clock.advance(0.1)
    assert (await waiting).response is not None
    assert inner.sent[-1][0] == 60.0


async def test_a_huggingface_503_with_estimated_time_is_retried_after_it_only_when_retries_allow():
    clock = InstantClock()
    loading = json.dumps({"error": "Model bert is currently loading", "estimated_time": 12.0}).encode()

    def script(n: int, call: Call) -> Response:
        if n in (1, 2, 4):
            return Response(503, {"content-type": "application/json"}, loading)
        return Response(200, {})

    quota_stage, inner, _ = stage_for(clock, script, QuotaPolicy(headers="huggingface"))
    policy = RetryPolicy(
        max_attempts=3,
        backoff=BackoffPolicy(initial=0.1, max=1, jitter="none"),
        budget=BudgetPolicy(ratio=1.0, min_per_second=100),
    )
    retry = RetryStage(quota_stage, "hf", policy, RetryBudget(policy.budget, clock), clock, None, EventBus())  # type: ignore[arg-type]
    # POST without the idempotency header: the 503 is returned, not retried
    plain = await retry(make_call(method="POST", deadline=clock.now() + 60))
    assert plain.response is not None and plain.response.status == 503
    assert len(inner.sent) == 1
    # with it: retried after estimated_time, not after the 0.1 s backoff
    call = make_call(method="POST", deadline=clock.now() + 60)
    call.has_idempotency_key = True
    result = await retry(call)
    assert result.response is not None and result.response.status == 200
    assert clock.waits == [12.0]
    # an estimated_time beyond the time left: no retry
    call = make_call(method="POST", deadline=clock.now() + 5)
    call.has_idempotency_key = True
    result = await retry(call)
    assert result.response is not None and result.response.status == 503


class InstantClock(FakeClock):
    def __init__(self) -> None:
        super().__init__(start=0.0)
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.advance(seconds)


async def test_injected_credentials_make_one_partition_for_every_caller():
    clock = FakeClock(start=0.0)
    injected = Upstream(name="gh", url="http://127.0.0.1:9", scheme="http", host="127.0.0.1:9", base_path="", headers=(("authorization", "token proxy"),))
    state = QuotaState(injected, QuotaPolicy(headers="github"), clock)
    assert state.partition(CIMultiDict({"Authorization": "a"})) == state.partition(CIMultiDict({"Authorization": "b"}))
    plain = QuotaState(UPSTREAM, QuotaPolicy(headers="github"), clock)
    assert plain.partition(CIMultiDict({"Authorization": "a"})) != plain.partition(CIMultiDict({"Authorization": "b"}))
    assert plain.partition(CIMultiDict()) is None




class Board:
    """Two QuotaStates sharing one board stand in for two sidecars sharing Redis; the real
    backend is exercised by the fleet test."""

    name = "redis"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.entries: dict[str, tuple[float, dict]] = {}
        self.gets = 0

    async def put_quota(self, key: str, snapshot: dict, ttl: float) -> None:
        self.entries[key] = (self.clock.now() + ttl, dict(snapshot))

    async def get_quota(self, key: str) -> dict | None:
        self.gets += 1
        entry = self.entries.get(key)
        return dict(entry[1]) if entry is not None and entry[0] > self.clock.now() else None


async def test_an_exhaustion_seen_by_one_sidecar_holds_back_another_without_a_request():
    clock = FakeClock(start=0.0)
    board = Board(clock)
    script = lambda n, c: Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})  # noqa: E731
    first, first_up, first_state = stage_for(clock, script)
    second, second_up, second_state = stage_for(clock, script)
    first_state.backend = second_state.backend = board
    await first(make_call(deadline=100.0))
    await settle()  # the snapshot is written by a background task
    assert "gh:-" in board.entries
    # the second sidecar never saw this quota: it reads the snapshot and waits, sending nothing
    refused = await second(make_call(deadline=10.0))
    assert refused.failure == "quota" and len(second_up.sent) == 0
    assert 29.0 < refused.retry_after <= 30.0 + RESET_MARGIN
    waiting = asyncio.create_task(second(make_call(deadline=100.0)))
    await settle()
    assert second_state.queued == 1
    clock.advance(30.2)
    assert (await waiting).response is not None and len(second_up.sent) == 1
    # reads are rate-limited to one per REFRESH per quota, not one per request
    await second(make_call(deadline=clock.now() + 1))
    gets = board.gets
    for _ in range(5):
        assert (await second(make_call(deadline=clock.now() + 1))).failure == "quota"
    assert board.gets == gets
    clock.advance(1.0)
    await second(make_call(deadline=clock.now() + 1))
    assert board.gets == gets + 1


async def test_callers_own_credentials_are_never_shared():
    clock = FakeClock(start=0.0)
    board = Board(clock)
    script = lambda n, c: Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})  # noqa: E731
    stage, _, state = stage_for(clock, script)
    state.backend = board
    await stage(make_call(headers={"Authorization": "token alice"}, deadline=100.0))
    await settle()
    assert board.entries == {} and board.gets == 0


async def test_closing_the_state_lets_waiters_go_with_a_refusal():
    clock = FakeClock(start=0.0)
    stage, inner, state = stage_for(
        clock, lambda n, c: Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    )
    await stage(make_call(deadline=100.0))
    waiting = asyncio.create_task(stage(make_call(deadline=100.0)))
    await settle()
    assert state.queued == 1
    state.close()  # the upstream's quota went with a reload, or the app stops
    result = await asyncio.wait_for(waiting, 1)
    assert result.failure == "quota" and len(inner.sent) == 1
    assert state.queued == 0

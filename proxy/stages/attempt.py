"""The innermost stage: one upstream attempt, bounded by the attempt timeout.

The attempt deadline is `min(now + per_try, call.deadline)`: one timer per attempt serves
both the per-try and the total timeout; which one fired decides `total_timeout`. The timer
is a bare `call_later` that cancels the task (what `asyncio.timeout` does, without its
per-use bookkeeping): this runs once per proxied request.
"""

from __future__ import annotations

import asyncio

from proxy.clock import Clock
from proxy.config.model import Route
from proxy.resilience.backoff import server_wait
from proxy.resilience.classify import Attempt, AttemptResult
from proxy.stages.call import Call, Result, Stage
from proxy.upstream import UpstreamClient, UpstreamFailure

# Statuses worth parsing Retry-After / X-RateLimit-Reset for (off the happy path).
_SERVER_WAIT_STATUSES = frozenset((403, 429, 500, 502, 503, 504))


class AttemptStage(Stage):
    __slots__ = ("client", "clock", "per_try")

    def __init__(self, route: Route, client: UpstreamClient, clock: Clock) -> None:
        super().__init__(None)
        self.client = client
        self.clock = clock
        self.per_try = route.timeout.per_try

    async def __call__(self, call: Call) -> Result:
        clock = self.clock
        start = clock.now()
        limit = self.per_try
        deadline = call.deadline
        total_bound = False
        if deadline is not None and (limit is None or start + limit >= deadline):
            limit = deadline - start
            total_bound = True
            if limit <= 0:
                return Result(failure="timeout", total_timeout=True)
        client = self.client
        client.in_flight += 1
        cutoff: _Cutoff | None = None
        handle: asyncio.TimerHandle | None = None
        if limit is not None:
            cutoff = _Cutoff()
            handle = asyncio.get_running_loop().call_later(limit, cutoff.fire)
        try:
            body = call.body
            response = await client.send(
                call.method,
                call.path_qs,
                call.headers,
                body.payload(),
                body.stream_length,
                on_interim=getattr(call, "on_interim", None),
            )
        except asyncio.CancelledError:
            if cutoff is None or not cutoff.fired or cutoff.task.uncancel() > 0:
                raise  # the client went away (or both happened): propagate
            return _failed(call, "timeout", clock.now() - start, False, total_bound)
        except UpstreamFailure as exc:
            if call.body.client_error is not None:
                raise call.body.client_error from None
            if exc.kind == "upstream-status":  # a 101 nobody asked for: answered 502
                return _bad_status(call, clock.now() - start)
            return _failed(call, exc.kind, clock.now() - start, exc.before_request, False)
        finally:
            client.in_flight -= 1
            if handle is not None:
                handle.cancel()
        duration = clock.now() - start
        status = response.status
        wait = None
        if status in _SERVER_WAIT_STATUSES:
            wait = server_wait(status, response.headers, clock.wall())
        attempt = Attempt.response(status, duration, wait)
        call.record.attempts.append((attempt.result, duration))
        result = Result(response)
        result.attempt = attempt
        return result


class _Cutoff:
    """Cancels the attempt's task when its deadline passes, and remembers that it did."""

    __slots__ = ("fired", "task")

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


def _bad_status(call: Call, duration: float) -> Result:
    """An interim status the proxy cannot relay (a `101`): the attempt got a response
    (metric result `status`, not a breaker failure, not retried); the client gets 502
    `upstream-status`."""
    call.record.attempts.append((AttemptResult.STATUS, duration))
    result = Result(failure="upstream-status")
    result.attempt = Attempt(AttemptResult.STATUS, 101, False, duration)
    return result


def _failed(call: Call, kind: str, duration: float, before: bool, total: bool) -> Result:
    call.record.attempts.append((kind, duration))
    result = Result(failure=kind, total_timeout=total)
    result.attempt = Attempt(AttemptResult(kind), None, before, duration)
    return result

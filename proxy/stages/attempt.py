"""The innermost stage: one upstream attempt, bounded by the attempt timeout.

The attempt deadline is `min(now + per_try, call.deadline)`: one cut-off per attempt serves
both the per-try and the total timeout; which one fired decides `total_timeout`. The
cut-off cancels the task (what `asyncio.timeout` does, without its per-use bookkeeping),
and is an entry in the loop's `Deadlines` rather than a timer of its own: this runs once
per proxied request.

Every failed attempt (connect failure, reset, timeout, a 5xx or 429) is reported to the
`FailureLog` with its cause (`ECONNREFUSED`, `timeout after 2.00s`, `status 503`), which
logs it at most once per route, upstream and cause per 10 s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.clock import Clock
from proxy.config.model import Route
from proxy.observe.causes import FailureLog, cause_of
from proxy.resilience.backoff import server_wait
from proxy.resilience.classify import Attempt, AttemptResult
from proxy.stages.call import Call, Result, Stage
from proxy.stages.deadlines import Cutoff, deadlines
from proxy.upstream import UpstreamClient, UpstreamFailure

if TYPE_CHECKING:
    from proxy.server.forwarding import HeaderPlan

# Statuses worth parsing Retry-After / X-RateLimit-Reset for (off the happy path).
_SERVER_WAIT_STATUSES = frozenset((403, 429, 500, 502, 503, 504))


class AttemptStage(Stage):
    """One attempt to one target. Target 0 (the route's upstream) sends `call.path_qs` and
    `call.headers`; another target of a failover route swaps the primary's base path for
    its own and builds its own headers (its Host, its injected credentials)."""

    __slots__ = (
        "base",
        "client",
        "clock",
        "connect_timeout",
        "cut",
        "failures",
        "index",
        "per_try",
        "plan",
        "route",
        "upstream",
    )

    def __init__(
        self,
        route: Route,
        client: UpstreamClient,
        clock: Clock,
        index: int = 0,
        plan: HeaderPlan | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        super().__init__(None)
        self.client = client
        self.clock = clock
        self.per_try = route.timeout.per_try
        self.index = index
        self.plan = plan if index else None
        # path_qs is primary.base_path + "/" + rest: this target's path replaces the base.
        self.cut = len(route.upstream.base_path)
        self.base = route.targets[index].base_path
        self.failures = failures
        self.route = route.name
        target = route.targets[index]
        self.upstream = target.name
        self.connect_timeout = target.connect_timeout

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
        cutoff: Cutoff | None = None
        if limit is not None:
            task = call.task
            if task is None:
                task = call.task = asyncio.current_task()
                assert task is not None
            cutoff = deadlines(task.get_loop()).arm(task, limit)
        try:
            body = call.body
            plan = self.plan
            if plan is None:
                path, headers = call.path_qs, call.headers
            else:
                path, headers = self.base + call.path_qs[self.cut :], call.headers_for(plan)
            response = await client.send(
                call.method,
                path,
                headers,
                body.payload(),
                body.stream_length,
                on_interim=call.on_interim,
            )
        except asyncio.CancelledError:
            if cutoff is None or not cutoff.fired or cutoff.task.uncancel() > 0:
                raise  # the client went away (or both happened): propagate
            if self.failures is not None:
                self.failures.failed(
                    self.route, self.upstream, "timeout", f"timeout after {limit:.2f}s"
                )
            return _failed(call, "timeout", clock.now() - start, False, total_bound, self.index)
        except UpstreamFailure as exc:
            if call.body.client_error is not None:
                raise call.body.client_error from None
            if self.failures is not None:
                cause = cause_of(exc, self.connect_timeout)
                self.failures.failed(self.route, self.upstream, exc.kind, cause)
            duration = clock.now() - start
            if exc.kind == "upstream-status":  # a 101 nobody asked for: answered 502
                return _bad_status(call, duration, self.index)
            return _failed(call, exc.kind, duration, exc.before_request, False, self.index)
        finally:
            client.in_flight -= 1
            if cutoff is not None:
                cutoff.disarm()
        duration = clock.now() - start
        status = response.status
        wait = None
        if status in _SERVER_WAIT_STATUSES:
            wait = server_wait(status, response.headers, clock.wall())
        result_kind = AttemptResult.STATUS if status >= 500 or status == 429 else AttemptResult.OK
        attempt = Attempt(result_kind, status, False, duration, wait)  # = Attempt.response
        call.record.attempts.append((result_kind, duration, self.index))
        if attempt.result is AttemptResult.STATUS and self.failures is not None:
            self.failures.failed(self.route, self.upstream, "status", f"status {status}")
        result = Result(response)
        result.attempt = attempt
        return result


def _bad_status(call: Call, duration: float, index: int) -> Result:
    """An interim status the proxy cannot relay (a `101`): the attempt got a response
    (metric result `status`, not a breaker failure, not retried); the client gets 502
    `upstream-status`."""
    call.record.attempts.append((AttemptResult.STATUS, duration, index))
    result = Result(failure="upstream-status")
    result.attempt = Attempt(AttemptResult.STATUS, 101, False, duration)
    return result


def _failed(
    call: Call, kind: str, duration: float, before: bool, total: bool, index: int
) -> Result:
    call.record.attempts.append((kind, duration, index))
    result = Result(failure=kind, total_timeout=total)
    result.attempt = Attempt(AttemptResult(kind), None, before, duration)
    return result

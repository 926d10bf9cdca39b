"""Bulkhead stage: at most `max_concurrent` attempts in flight per route and upstream.

The slot is held until the response body has been streamed (or discarded), released by the
result's cleanup. Waiting in the queue is bounded by `queue_timeout` and the time left.
A rejection is a `bulkhead-full` result: never retried, never a breaker failure.
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.resilience.bulkhead import Bulkhead
from proxy.stages.call import Call, Result, Stage


class BulkheadStage(Stage):
    __slots__ = ("bulkhead", "clock")

    def __init__(self, next_stage: Stage, bulkhead: Bulkhead, clock: Clock) -> None:
        super().__init__(next_stage)
        self.bulkhead = bulkhead
        self.clock = clock

    async def __call__(self, call: Call) -> Result:
        bulkhead = self.bulkhead
        if not bulkhead.try_acquire():  # a free slot is taken without awaiting
            time_left = None if call.deadline is None else call.deadline - self.clock.now()
            if not await bulkhead.acquire(time_left):
                call.record.bulkhead_rejected += 1
                return Result(failure="bulkhead-full")
        try:
            assert self.next is not None
            result = await self.next(call)
        except BaseException:
            bulkhead.release()
            raise
        if result.response is None:
            bulkhead.release()
        else:
            result.cleanups.append(bulkhead.release)
        return result

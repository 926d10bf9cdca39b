"""Breaker stage: asks the route's breaker for a permit and reports the attempt's outcome.

Not recorded (DESIGN §6): bulkhead rejections and attempts cancelled by the client or cut by
the total timeout; their permit is returned instead.
"""

from __future__ import annotations

import asyncio

from proxy.resilience.breaker import Breaker
from proxy.stages.call import Call, Result, Stage


class BreakerStage(Stage):
    __slots__ = ("breaker",)

    def __init__(self, next_stage: Stage, breaker: Breaker) -> None:
        super().__init__(next_stage)
        self.breaker = breaker

    async def __call__(self, call: Call) -> Result:
        breaker = self.breaker
        permit = breaker.acquire()
        if permit is None:
            call.record.breaker_rejected += 1
            return Result(failure="breaker-open", retry_after=breaker.retry_after())
        try:
            assert self.next is not None
            result = await self.next(call)
        except asyncio.CancelledError:
            breaker.release(permit)
            raise
        except BaseException:
            breaker.release(permit)
            raise
        attempt = result.attempt
        if attempt is None or result.total_timeout:
            breaker.release(permit)
        else:
            breaker.record(permit, attempt)
        return result

"""Total-timeout stage: sets the request's deadline; inner stages bound every wait by it.

`total` runs until the final attempt's response head (queueing, attempts and backoff
included). A caller may lower it, never raise it, with `X-Resilience-Timeout-Ms`.
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.stages.call import Call, Result, Stage


class TotalTimeoutStage(Stage):
    __slots__ = ("clock", "total")

    def __init__(self, next_stage: Stage, total: float | None, clock: Clock) -> None:
        super().__init__(next_stage)
        self.total = total
        self.clock = clock

    async def __call__(self, call: Call) -> Result:
        if self.total is not None:
            deadline = self.clock.now() + self.total
            if call.deadline is None or deadline < call.deadline:
                call.deadline = deadline
        assert self.next is not None
        result = await self.next(call)
        if (
            result.failure is not None
            and call.deadline is not None
            and self.clock.now() >= call.deadline
        ):
            result.failure = "timeout"
            result.total_timeout = True
        return result

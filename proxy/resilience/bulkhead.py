"""The bulkhead: at most `max_concurrent` attempts in flight, a bounded FIFO queue behind.

Up to `max_queued` callers wait, each at most `queue_timeout`, in arrival order; beyond
that a caller is rejected at once. A freed slot is handed straight to the oldest waiter
(no barging), and a waiter cancelled after being handed a slot passes it on, so a slot is
never leaked. The free-slot path creates no task, future or timer.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy.clock import Clock
from proxy.config.model import BulkheadPolicy

__all__ = ["Bulkhead"]


class Bulkhead:
    """Concurrency limit for one route and upstream: `acquire` a slot, `release` it once."""

    __slots__ = ("_clock", "_in_flight", "_policy", "_waiters")

    def __init__(self, policy: BulkheadPolicy, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._in_flight = 0
        # Pending waiters, oldest first; each future resolves True (slot handed over) or
        # False (queue timeout). Cancelled waiters remove themselves.
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def policy(self) -> BulkheadPolicy:
        return self._policy

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot now."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot now if there is one and nobody queues for it (no await)."""
        if self._in_flight < self._policy.max_concurrent and not self._waiters:
            self._in_flight += 1
            return True
        return False

    async def acquire(self, time_left: float | None = None) -> bool:
        """Take a slot: True when held (call `release` exactly once), False when rejected
        (queue full, or no slot within min(queue_timeout, time_left) seconds)."""
        policy = self._policy
        if self._in_flight < policy.max_concurrent and not self._waiters:
            self._in_flight += 1
            return True
        timeout = (
            policy.queue_timeout if time_left is None else min(policy.queue_timeout, time_left)
        )
        if len(self._waiters) >= policy.max_queued or timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        # Raced against the injected clock (not loop.call_later) so FakeClock drives it.
        timer = loop.create_task(self._expire(fut, timeout))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # handed a slot just as we were cancelled: pass it on
            else:
                self._discard(fut)
            raise
        finally:
            timer.cancel()

    def release(self) -> None:
        """Give a slot back; the oldest waiter, if any, gets it."""
        if self._in_flight <= 0:
            raise RuntimeError("bulkhead release without a matching acquire")
        self._in_flight -= 1
        if self._waiters:
            self._drain()

    def update_policy(self, policy: BulkheadPolicy) -> None:
        """Apply a reloaded policy: a higher `max_concurrent` admits waiters at once; a lower
        one lets held slots finish; queue limits apply to new arrivals."""
        self._policy = policy
        self._drain()

    def _drain(self) -> None:
        while self._waiters and self._in_flight < self._policy.max_concurrent:
            fut = self._waiters.popleft()
            if fut.done():  # defensive: finished waiters normally leave the queue themselves
                continue
            self._in_flight += 1
            fut.set_result(True)

    def _discard(self, fut: asyncio.Future[bool]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    async def _expire(self, fut: asyncio.Future[bool], timeout: float) -> None:
        await self._clock.sleep(timeout)
        if not fut.done():
            self._discard(fut)
            fut.set_result(False)

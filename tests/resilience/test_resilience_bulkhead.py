"""Bulkhead: slots, a FIFO queue with a timeout on the FakeClock, and no leaked slot on cancel."""

from __future__ import annotations

import asyncio

import pytest

from proxy.clock import FakeClock
from proxy.config.model import BulkheadPolicy
from proxy.resilience.bulkhead import Bulkhead


async def settle() -> None:
    """Let every ready task run (a few loop turns, no real time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


def make(max_concurrent: int = 1, max_queued: int = 10, queue_timeout: float = 1.0) -> Bulkhead:
    return Bulkhead(BulkheadPolicy(max_concurrent, max_queued, queue_timeout), FakeClock())


async def test_free_slots_are_granted_at_once_without_tasks() -> None:
    bulkhead = make(max_concurrent=2)
    tasks_before = len(asyncio.all_tasks())
    assert await bulkhead.acquire()
    assert await bulkhead.acquire()
    assert len(asyncio.all_tasks()) == tasks_before
    assert (bulkhead.in_flight, bulkhead.queued) == (2, 0)
    bulkhead.release()
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_waiters_get_freed_slots_in_arrival_order() -> None:
    bulkhead = make(max_concurrent=1)
    assert await bulkhead.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        assert await bulkhead.acquire()
        order.append(n)

    tasks = [asyncio.create_task(wait(n)) for n in range(4)]
    await settle()
    assert bulkhead.queued == 4
    for expected in range(4):
        bulkhead.release()
        await settle()
        assert order == list(range(expected + 1))
        assert bulkhead.in_flight == 1
    await asyncio.gather(*tasks)
    assert bulkhead.queued == 0


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    bulkhead = make(max_concurrent=1)
    assert await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await settle()
    bulkhead.release()  # handed to the waiter before it even runs
    newcomer = asyncio.create_task(bulkhead.acquire())
    await settle()
    assert waiter.done() and waiter.result() is True
    assert not newcomer.done() and bulkhead.queued == 1
    bulkhead.release()
    assert await newcomer


async def test_a_full_queue_rejects_at_once() -> None:
    bulkhead = make(max_concurrent=1, max_queued=2)
    assert await bulkhead.acquire()
    waiters = [asyncio.create_task(bulkhead.acquire()) for _ in range(2)]
    await settle()
    assert await bulkhead.acquire() is False
    assert bulkhead.queued == 2
    for w in waiters:
        w.cancel()
    await settle()


async def test_no_queue_means_reject_when_busy() -> None:
    bulkhead = make(max_concurrent=1, max_queued=0)
    assert await bulkhead.acquire()
    assert await bulkhead.acquire() is False
    zero_wait = make(max_concurrent=1, queue_timeout=0.0)
    assert await zero_wait.acquire()
    assert await zero_wait.acquire() is False


async def test_waiting_longer_than_queue_timeout_is_a_rejection() -> None:
    clock = FakeClock()
    bulkhead = Bulkhead(BulkheadPolicy(1, 10, 1.0), clock)
    assert await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await settle()
    clock.advance(0.9)
    await settle()
    assert not waiter.done()
    clock.advance(0.1)
    await settle()
    assert waiter.done() and waiter.result() is False
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_the_time_left_shortens_the_queue_wait() -> None:
    clock = FakeClock()
    bulkhead = Bulkhead(BulkheadPolicy(1, 10, 5.0), clock)
    assert await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire(time_left=0.5))
    await settle()
    clock.advance(0.5)
    await settle()
    assert waiter.done() and waiter.result() is False
    assert await bulkhead.acquire(time_left=0.0) is False


async def test_a_slot_freed_in_time_beats_the_timeout() -> None:
    clock = FakeClock()
    bulkhead = Bulkhead(BulkheadPolicy(1, 10, 1.0), clock)
    assert await bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await settle()
    bulkhead.release()
    clock.advance(1.0)  # the timer fires too, after the hand-over: the grant stands
    await settle()
    assert waiter.result() is True
    assert bulkhead.in_flight == 1


async def test_a_thousand_cancelled_waiters_leak_nothing() -> None:
    clock = FakeClock()
    bulkhead = Bulkhead(BulkheadPolicy(2, 1000, 30.0), clock)
    assert await bulkhead.acquire()
    assert await bulkhead.acquire()
    waiters = [asyncio.create_task(bulkhead.acquire()) for _ in range(1000)]
    await settle()
    assert bulkhead.queued == 1000
    for w in waiters:
        w.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert (bulkhead.in_flight, bulkhead.queued) == (2, 0)
    bulkhead.release()
    bulkhead.release()
    assert bulkhead.in_flight == 0
    assert await bulkhead.acquire() and await bulkhead.acquire()
    clock.advance(60.0)  # the cancelled waiters' timers are gone: nothing fires
    await settle()
    assert (bulkhead.in_flight, bulkhead.queued) == (2, 0)


async def test_a_waiter_cancelled_right_after_being_granted_passes_the_slot_on() -> None:
    bulkhead = make(max_concurrent=1)
    assert await bulkhead.acquire()
    first = asyncio.create_task(bulkhead.acquire())
    second = asyncio.create_task(bulkhead.acquire())
    await settle()
    bulkhead.release()  # granted to `first`, which has not resumed yet...
    first.cancel()  # ...and is cancelled before it could use the slot
    await settle()
    assert first.cancelled()
    assert second.result() is True
    assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_raising_max_concurrent_wakes_waiters() -> None:
    bulkhead = make(max_concurrent=1)
    assert await bulkhead.acquire()
    waiters = [asyncio.create_task(bulkhead.acquire()) for _ in range(3)]
    await settle()
    bulkhead.update_policy(BulkheadPolicy(3, 10, 1.0))
    await settle()
    assert [w.done() for w in waiters] == [True, True, False]
    assert (bulkhead.in_flight, bulkhead.queued) == (3, 1)
    waiters[2].cancel()
    await settle()


async def test_lowering_max_concurrent_lets_held_slots_drain_first() -> None:
    bulkhead = make(max_concurrent=3)
    for _ in range(3):
        assert await bulkhead.acquire()
    bulkhead.update_policy(BulkheadPolicy(1, 10, 1.0))
    waiter = asyncio.create_task(bulkhead.acquire())
    await settle()
    bulkhead.release()
    bulkhead.release()
    await settle()
    assert not waiter.done()  # still 1 in flight = the new limit
    bulkhead.release()
    await settle()
    assert waiter.result() is True


async def test_release_without_acquire_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        make().release()

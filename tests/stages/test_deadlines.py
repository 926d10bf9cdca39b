"""The attempt deadlines share one loop timer: each fires on time, a disarmed one never
fires, and finished entries do not pile up. Time is a fake loop's clock, advanced by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from proxy.stages.deadlines import SLACK, Deadlines, deadlines


class _Handle:
    def __init__(self, loop: _FakeLoop, when: float, fn: Callable[[], None]) -> None:
        self.loop, self.when, self.fn, self.cancelled = loop, when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class _FakeLoop:
    """What `Deadlines` uses of a loop: `time()` and `call_at()`; `advance` runs the due
    timers in order, as a loop iteration would."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable[[], None]) -> _Handle:
        handle = _Handle(self, when, fn)
        self.timers.append(handle)
        return handle

    def armed(self) -> list[float]:
        return sorted(h.when for h in self.timers if not h.cancelled)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [h for h in self.timers if not h.cancelled and h.when <= self.now]
            if not due:
                return
            handle = min(due, key=lambda h: h.when)
            self.timers.remove(handle)
            handle.fn()


class _Task:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return True


def _setup() -> tuple[_FakeLoop, Deadlines]:
    loop = _FakeLoop()
    return loop, Deadlines(cast(asyncio.AbstractEventLoop, loop))


def _arm(d: Deadlines, task: _Task, delay: float) -> Any:
    return d.arm(cast("asyncio.Task[object]", task), delay)


def test_a_deadline_cancels_its_task_when_it_passes_and_not_before() -> None:
    loop, d = _setup()
    task = _Task()
    cutoff = _arm(d, task, 2.0)
    loop.advance(2.0 - SLACK - 0.01)
    assert task.cancels == 0 and not cutoff.fired
    loop.advance(SLACK + 0.01)
    assert task.cancels == 1 and cutoff.fired
    assert d.live == 0 and d.pending() == 0


def test_a_disarmed_deadline_never_fires_and_no_timer_is_left_for_it() -> None:
    loop, d = _setup()
    task = _Task()
    cutoff = _arm(d, task, 1.0)
    cutoff.disarm()
    loop.advance(5.0)
    assert task.cancels == 0 and not cutoff.fired
    assert loop.armed() == [] and d.pending() == 0


def test_many_deadlines_share_one_timer_and_each_fires_at_its_own_time() -> None:
    loop, d = _setup()
    tasks = [_Task() for _ in range(3)]
    for task, delay in zip(tasks, (3.0, 1.0, 2.0), strict=True):
        _arm(d, task, delay)
    assert len(loop.armed()) == 1  # re-armed for the earliest: one live timer
    assert loop.armed() == [101.0]
    loop.advance(1.0)
    assert [t.cancels for t in tasks] == [0, 1, 0]
    loop.advance(1.0)
    assert [t.cancels for t in tasks] == [0, 1, 1]
    loop.advance(1.0)
    assert [t.cancels for t in tasks] == [1, 1, 1]
    assert loop.armed() == []


def test_a_later_deadline_does_not_rearm_the_timer() -> None:
    loop, d = _setup()
    _arm(d, _Task(), 1.0)
    before = len(loop.timers)
    for _ in range(10):
        _arm(d, _Task(), 5.0)
    assert len(loop.timers) == before  # a heap push each, no timer call


def test_finished_attempts_leave_the_heap_as_new_ones_arrive() -> None:
    """Attempts that finish in order (the common case) keep the heap at the in-flight count."""
    loop, d = _setup()
    in_flight = []
    for _ in range(10_000):
        in_flight.append(_arm(d, _Task(), 10.0))
        if len(in_flight) > 32:
            in_flight.pop(0).disarm()
        loop.advance(0.0001)
    assert d.pending() <= 34
    assert d.live == 32


def test_finished_entries_behind_a_long_lived_one_are_swept() -> None:
    """One attempt hangs (its deadline at the top); thousands after it finish: the heap is
    rebuilt instead of holding them all until the hung one's deadline."""
    loop, d = _setup()
    hung = _Task()
    _arm(d, hung, 10.0)
    for _ in range(20_000):
        _arm(d, _Task(), 10.0).disarm()
    assert d.pending() <= 2 * d.live + 300
    loop.advance(10.0)
    assert hung.cancels == 1 and d.pending() == 0


async def test_on_a_real_loop_a_deadline_cancels_the_attempt() -> None:
    loop = asyncio.get_running_loop()
    d = deadlines(loop)
    assert deadlines(loop) is d  # one per loop

    async def attempt() -> str:
        task = asyncio.current_task()
        assert task is not None
        cutoff = d.arm(task, 0.02)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert cutoff.fired
            return "cut"
        return "answered"

    assert await asyncio.wait_for(attempt(), 5) == "cut"

"""Attempt deadlines: many cut-offs on one loop timer.

Every upstream attempt has a deadline (`per_try`, bounded by the total timeout). A timer
per attempt (`loop.call_later` + `cancel`) costs about 2 µs on uvloop, where each timer is
a libuv handle that is started, stopped and closed; an attempt that answers in a
millisecond pays that for a deadline that never fires. Here the deadlines of one loop sit
in a heap and one loop timer is armed for the earliest: adding one is a heap push, and a
finished attempt only marks its entry done (`Cutoff.disarm`).

Finished entries leave the heap when they reach its top (on the next `arm`, or when the
timer fires); attempts mostly finish in the order they started, so the heap holds about as
many entries as there are attempts in flight. Should finished entries pile up behind a
long-lived one, the heap is rebuilt once they outnumber the live ones (amortised O(1)).

A cut-off fires at or after its deadline, never more than `SLACK` early (a loop's timers
may fire up to its clock resolution before the time asked for; asyncio allows the same).
"""

from __future__ import annotations

import asyncio
from heapq import heapify, heappop, heappush
from itertools import count

SLACK = 0.001  # seconds a deadline may fire early (the loop's timer resolution)
_COMPACT_MIN = 256  # heap size from which finished entries are swept out


class Cutoff:
    """Cancels an attempt's task when its deadline passes, and remembers that it did."""

    __slots__ = ("_owner", "done", "fired", "task")

    def __init__(self, task: asyncio.Task[object], owner: Deadlines) -> None:
        self.task = task
        self._owner = owner
        self.fired = False
        self.done = False

    def disarm(self) -> None:
        """The attempt ended first: the deadline no longer matters."""
        if not self.done:
            self.done = True
            self._owner.live -= 1

    def _fire(self) -> None:
        self.done = True
        self.fired = True
        self.task.cancel()


class Deadlines:
    """The pending cut-offs of one event loop, on one timer armed for the earliest."""

    __slots__ = ("_armed", "_heap", "_loop", "_seq", "_timer", "live")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Cutoff]] = []
        self._seq = count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed = float("inf")  # when the timer fires (inf: not armed)
        self.live = 0  # entries not yet done

    def arm(self, task: asyncio.Task[object], delay: float) -> Cutoff:
        """A cut-off that cancels `task` in `delay` seconds unless disarmed first."""
        cutoff = Cutoff(task, self)
        when = self._loop.time() + delay
        heap = self._heap
        while heap and heap[0][2].done:
            heappop(heap)
        heappush(heap, (when, next(self._seq), cutoff))
        self.live += 1
        if when < self._armed:
            self._rearm(when)
        elif len(heap) > _COMPACT_MIN and len(heap) > 2 * self.live:
            self._compact()
        return cutoff

    def pending(self) -> int:
        """Entries still in the heap (live or not yet swept), for tests."""
        return len(self._heap)

    def _rearm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._armed = float("inf")
        heap = self._heap
        now = self._loop.time() + SLACK
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, cutoff = heappop(heap)
            if not cutoff.done:
                self.live -= 1
                cutoff._fire()
        if heap:
            self._rearm(heap[0][0])

    def _compact(self) -> None:
        heap = [entry for entry in self._heap if not entry[2].done]
        heapify(heap)
        self._heap = heap


_current: tuple[asyncio.AbstractEventLoop | None, Deadlines | None] = (None, None)


def deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The deadlines of `loop` (one per loop; a proxy has one loop, a test suite many)."""
    global _current
    cached_loop, cached = _current
    if cached_loop is loop and cached is not None:
        return cached
    made = Deadlines(loop)
    _current = (loop, made)  # the previous loop's entries keep their own timer
    return made

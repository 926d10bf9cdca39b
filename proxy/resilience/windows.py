"""Sliding windows of call outcomes for the breaker, kept as running totals.

Like Resilience4j's `SlidingTimeWindowMetrics` and `FixedSizeSlidingWindowMetrics`: each
recorded call adds to the totals, each evicted bucket or call is subtracted from them, so
reading a rate is O(1) and recording is O(1) amortised whatever the window's size.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

from proxy.clock import Clock
from proxy.config.model import BreakerPolicy

__all__ = ["CountWindow", "OutcomeWindow", "TimeWindow", "WindowShape", "make_window", "shape_of"]

# The identity of a window's shape: ("time", seconds) or ("count", calls). A reload resets
# a breaker's window only when this changes.
WindowShape = tuple[Literal["time", "count"], int]


class OutcomeWindow(Protocol):
    def record(self, failed: bool, slow: bool) -> bool:
        """Add one outcome; True when the window now holds a failure or a slow call (so a
        breaker need not evaluate its trip rules after a success in a clean window)."""
        ...

    @property
    def calls(self) -> int: ...

    @property
    def failures(self) -> int: ...

    @property
    def slow_calls(self) -> int: ...

    @property
    def failure_rate(self) -> float: ...

    @property
    def slow_rate(self) -> float: ...

    def reset(self) -> None: ...


class TimeWindow:
    """Outcomes of the last `seconds` seconds, in one bucket per whole second of the clock.

    The window covers the current second and the `seconds - 1` before it, so a call ages
    out between `seconds - 1` and `seconds` after it was recorded.
    """

    __slots__ = ("_calls", "_clock", "_failures", "_head", "_size", "_slow", "_totals")

    def __init__(self, seconds: int, clock: Clock) -> None:
        if seconds < 1:
            raise ValueError(f"a time window needs at least 1 second, got {seconds}")
        self._clock = clock
        self._size = seconds
        self._calls = [0] * seconds
        self._failures = [0] * seconds
        self._slow = [0] * seconds
        self._totals = [0, 0, 0]  # calls, failures, slow calls
        self._head = math.floor(clock.now())

    def _roll(self) -> int:
        """Subtract the buckets that fell out of the window; return the current slot."""
        second = math.floor(self._clock.now())
        if second > self._head:
            totals = self._totals
            for s in range(max(self._head + 1, second - self._size + 1), second + 1):
                slot = s % self._size
                totals[0] -= self._calls[slot]
                totals[1] -= self._failures[slot]
                totals[2] -= self._slow[slot]
                self._calls[slot] = self._failures[slot] = self._slow[slot] = 0
            self._head = second
        return second % self._size

    def record(self, failed: bool, slow: bool) -> bool:
        slot = self._roll()
        totals = self._totals
        self._calls[slot] += 1
        totals[0] += 1
        if failed:
            self._failures[slot] += 1
            totals[1] += 1
        if slow:
            self._slow[slot] += 1
            totals[2] += 1
        return bool(totals[1] or totals[2])

    @property
    def calls(self) -> int:
        self._roll()
        return self._totals[0]

    @property
    def failures(self) -> int:
        self._roll()
        return self._totals[1]

    @property
    def slow_calls(self) -> int:
        self._roll()
        return self._totals[2]

    @property
    def failure_rate(self) -> float:
        """failures / calls in the window, 0.0 when empty."""
        self._roll()
        calls = self._totals[0]
        return self._totals[1] / calls if calls else 0.0

    @property
    def slow_rate(self) -> float:
        """slow calls / calls in the window, 0.0 when empty."""
        self._roll()
        calls = self._totals[0]
        return self._totals[2] / calls if calls else 0.0

    def reset(self) -> None:
        self._calls = [0] * self._size
        self._failures = [0] * self._size
        self._slow = [0] * self._size
        self._totals = [0, 0, 0]
        self._head = math.floor(self._clock.now())


_FAILED = 1
_SLOW = 2


class CountWindow:
    """Outcomes of the last `size` calls, in a ring; the oldest is subtracted when replaced."""

    __slots__ = ("_calls", "_failures", "_next", "_ring", "_size", "_slow")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a count window needs at least 1 call, got {size}")
        self._size = size
        self._ring = bytearray(size)  # per call: bit 0 failed, bit 1 slow
        self._next = 0
        self._calls = 0
        self._failures = 0
        self._slow = 0

    def record(self, failed: bool, slow: bool) -> bool:
        if self._calls == self._size:
            old = self._ring[self._next]
            self._failures -= old & _FAILED
            self._slow -= (old & _SLOW) >> 1
        else:
            self._calls += 1
        value = (_FAILED if failed else 0) | (_SLOW if slow else 0)
        self._ring[self._next] = value
        self._failures += failed
        self._slow += slow
        self._next = (self._next + 1) % self._size
        return bool(self._failures or self._slow)

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def slow_calls(self) -> int:
        return self._slow

    @property
    def failure_rate(self) -> float:
        """failures / calls in the window, 0.0 when empty."""
        return self._failures / self._calls if self._calls else 0.0

    @property
    def slow_rate(self) -> float:
        """slow calls / calls in the window, 0.0 when empty."""
        return self._slow / self._calls if self._calls else 0.0

    def reset(self) -> None:
        self._ring = bytearray(self._size)
        self._next = 0
        self._calls = self._failures = self._slow = 0


def shape_of(policy: BreakerPolicy) -> WindowShape | None:
    """The window a breaker policy needs, or None when neither a failure-rate nor a
    slow-call trigger is configured. Slow calls without `failure_rate` use its default
    window (60 s)."""
    rate = policy.failure_rate
    if rate is None:
        if policy.slow_calls is None:
            return None
        return ("time", 60)
    if rate.window_calls is not None:
        return ("count", rate.window_calls)
    return ("time", max(1, math.ceil(rate.window if rate.window is not None else 60.0)))


def make_window(shape: WindowShape, clock: Clock) -> OutcomeWindow:
    kind, size = shape
    if kind == "count":
        return CountWindow(size)
    return TimeWindow(size, clock)

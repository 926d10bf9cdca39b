"""Time and randomness, injected everywhere.

Nothing else in `proxy/` reads the clock or draws random numbers directly (ruff bans
`time.monotonic`, `time.time`, `asyncio.sleep` and `random` outside this module), so unit
tests drive every timer with `FakeClock` and every jitter with a seeded or scripted rng.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds: for deadlines, windows and durations."""

    def wall(self) -> float:
        """Epoch seconds: for persisted state and HTTP dates only."""

    async def sleep(self, seconds: float) -> None: ...


class Rng(Protocol):
    def uniform(self, low: float, high: float) -> float: ...

    def getrandbits(self, k: int, /) -> int:
        """k random bits as an int (request IDs)."""
        ...


class SystemClock:
    """The real clock: the event loop's monotonic time and the system's wall time."""

    __slots__ = ()

    # The C functions themselves (builtins do not bind as methods): `clock.now()` costs a
    # call of `time.monotonic`, no Python frame; the request path reads the clock often.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when a test calls `advance`.

    `sleep` suspends until the clock has been advanced past the wake-up time, so async
    code under test can be stepped without real waiting.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)


def system_rng() -> Rng:
    return random.Random()


SYSTEM_CLOCK = SystemClock()

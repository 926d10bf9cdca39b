"""The small breaker in front of Redis (DESIGN §15): Redis must never be a dependency.

    up ──3 consecutive errors──▶ down ──a background probe succeeded──▶ up
                                  │ probes every 5 s; a failed probe keeps it down

While down, callers do not ask Redis at all (they answer locally), so an outage costs at
most the calls that were already in flight plus the `FAILURES` that tripped it, each
bounded by `state.timeout`. The guard is pure: the backend reports outcomes and reads
`up`; the clock decides when a probe is due.
"""

from __future__ import annotations

from typing import Final

from proxy.clock import Clock

__all__ = ["FAILURES", "PROBE_EVERY", "Guard"]

FAILURES: Final = 3  # consecutive errors that take the backend down
PROBE_EVERY: Final = 5.0  # seconds between background probes while down


class Guard:
    __slots__ = ("_clock", "_failures", "_probe_at", "down_since", "up")

    def __init__(self, clock: Clock, *, up: bool = True) -> None:
        self._clock = clock
        self.up = up
        self._failures = 0
        self.down_since: float | None = None if up else clock.now()
        self._probe_at = clock.now() + PROBE_EVERY if not up else 0.0

    def succeeded(self) -> None:
        """A call worked: the error count starts again. While down, only a probe brings the
        backend back (a late answer to a call sent before the outage proves little)."""
        if self.up:
            self._failures = 0

    def probe_succeeded(self) -> bool:
        """The background probe worked. Returns True when this brought the backend back up."""
        self._failures = 0
        if self.up:
            return False
        self.up = True
        self.down_since = None
        return True

    def failed(self) -> bool:
        """A call failed. Returns True when this took the backend down."""
        self._failures += 1
        if not self.up or self._failures < FAILURES:
            return False
        self.go_down()
        return True

    def go_down(self) -> None:
        """Down at once (e.g. the first connect at start failed): the next probe in 5 s."""
        now = self._clock.now()
        self.up = False
        self.down_since = now
        self._probe_at = now + PROBE_EVERY

    def probe_failed(self) -> None:
        self._probe_at = self._clock.now() + PROBE_EVERY

    def probe_due_in(self) -> float | None:
        """Seconds until the next probe (0 when due), or None while up."""
        if self.up:
            return None
        return max(0.0, self._probe_at - self._clock.now())

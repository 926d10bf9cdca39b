"""The last 15 minutes of one route, for the status page's plots (DESIGN §8).

Bounded memory: `SLOTS` slots of `SLOT_SECONDS` each in a ring, indexed by
`int(now // SLOT_SECONDS) % SLOTS` and tagged with that slot number, so a slot left over
from an earlier lap reads as empty. Each slot holds the requests, the failures by outcome
and a latency histogram on the metric buckets (from which p50/p99 are estimated by linear
interpolation within a bucket, as PromQL's `histogram_quantile` does). Breaker transitions
are kept as the last `MAX_TRANSITIONS` (time, from, to), from which a per-slot timeline of
the worst state in force is derived at read time.

Times are the monotonic clock's; `snapshot` is given the wall time to label the plots.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

SLOT_SECONDS = 10.0
SLOTS = 90  # 15 minutes
MAX_TRANSITIONS = 64

# The metric buckets (DESIGN §9), repeated here to keep this module free of prometheus.
BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 900.0,
)  # fmt: skip
_NOT_FAILURES = frozenset(("ok", "client-cancelled"))

# Worse states win a slot: an open breaker during any part of it shows as open.
_RANK = {
    "closed": 0, "disabled": 0, "forced_closed": 0, "half_open": 1, "open": 2, "forced_open": 2,
}  # fmt: skip


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (seconds) of non-cumulative bucket counts on `BOUNDS` (+Inf last),
    interpolated linearly within its bucket; None without observations. A quantile in the
    +Inf bucket reports the highest finite bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[i - 1] if i > 0 else 0.0
            return low + (BOUNDS[i] - low) * ((rank - seen) / n)
        seen += n
    return BOUNDS[-1]


class RouteHistory:
    __slots__ = ("_failures", "_latency", "_requests", "_tags", "transitions")

    def __init__(self) -> None:
        self._tags = [-1] * SLOTS
        self._requests = [0] * SLOTS
        self._failures: list[dict[str, int] | None] = [None] * SLOTS
        self._latency: list[list[int] | None] = [None] * SLOTS
        self.transitions: deque[tuple[float, str, str]] = deque(maxlen=MAX_TRANSITIONS)

    def add(self, now: float, outcome: str, duration: float) -> None:
        """One finished request: its outcome and its duration in seconds."""
        self.add_in(now, outcome, bisect_left(BOUNDS, duration))

    def add_in(self, now: float, outcome: str, bucket: int) -> None:
        """`add` with the duration's bucket on `BOUNDS` already found (the metrics did)."""
        n = int(now // SLOT_SECONDS)
        i = n % SLOTS
        if self._tags[i] != n:
            self._tags[i] = n
            self._requests[i] = 0
            self._failures[i] = None
            self._latency[i] = None
        self._requests[i] += 1
        latency = self._latency[i]
        if latency is None:
            latency = self._latency[i] = [0] * (len(BOUNDS) + 1)
        latency[bucket] += 1
        if outcome not in _NOT_FAILURES:
            failures = self._failures[i]
            if failures is None:
                failures = self._failures[i] = {}
            failures[outcome] = failures.get(outcome, 0) + 1

    def note_breaker(self, at: float, from_state: str, to_state: str) -> None:
        """A breaker transition of this route, at monotonic time `at`."""
        self.transitions.append((at, from_state, to_state))

    def snapshot(self, now: float, wall_now: float, breaker_now: str | None) -> dict[str, Any]:
        """The slots oldest first, ending with the current one: requests, failures by
        outcome, p50/p99 in ms (None when the slot had no request), the worst breaker
        state in force per slot (None without a breaker), and summaries."""
        current = int(now // SLOT_SECONDS)
        first = current - SLOTS + 1
        requests: list[int] = []
        failures: dict[str, list[int]] = {}
        p50: list[float | None] = []
        p99: list[float | None] = []
        merged = [0] * (len(BOUNDS) + 1)
        for k, n in enumerate(range(first, current + 1)):
            i = n % SLOTS
            live = self._tags[i] == n
            requests.append(self._requests[i] if live else 0)
            slot_failures = self._failures[i] if live else None
            if slot_failures:
                for outcome, count in slot_failures.items():
                    failures.setdefault(outcome, [0] * SLOTS)[k] = count
            latency = self._latency[i] if live else None
            if latency:
                p50.append(_ms(quantile(latency, 0.5)))
                p99.append(_ms(quantile(latency, 0.99)))
                merged = [a + b for a, b in zip(merged, latency, strict=True)]
            else:
                p50.append(None)
                p99.append(None)
        return {
            "slot_seconds": SLOT_SECONDS,
            "end": wall_now,
            "requests": requests,
            "failures": failures,
            "p50_ms": p50,
            "p99_ms": p99,
            "breaker": self._timeline(first, breaker_now) if breaker_now else None,
            "latency_ms": {
                "p50": _ms(quantile(merged, 0.5)),
                "p99": _ms(quantile(merged, 0.99)),
            },
        }

    def _timeline(self, first: int, breaker_now: str) -> list[str]:
        """Per slot, the worst state the breaker was in at any time during it."""
        events = list(self.transitions)
        start = first * SLOT_SECONDS
        j = 0
        while j < len(events) and events[j][0] < start:
            j += 1
        # The state at the window's start: after the last earlier transition, else before
        # the first later one, else (nothing changed) the current state.
        if j > 0:
            state = events[j - 1][2]
        elif events:
            state = events[0][1]
        else:
            state = breaker_now
        out: list[str] = []
        for k in range(SLOTS):
            end = (first + k + 1) * SLOT_SECONDS
            worst = state
            while j < len(events) and events[j][0] < end:
                state = events[j][2]
                if _RANK.get(state, 0) > _RANK.get(worst, 0):
                    worst = state
                j += 1
            out.append(worst)
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)

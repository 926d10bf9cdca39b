"""Local token buckets and quota snapshots: the in-process half of the fleet state.

A bucket holds up to `burst` tokens and refills at `rps` tokens per second; a call taking
`cost` tokens is admitted when that many are there. Over any interval T a bucket admits at
most `burst + rps × T` (DESIGN §14). A refused call's retry-after is the time until `cost`
tokens will be there: `(cost − tokens) / rps`. The same arithmetic runs inside Redis as a
Lua script (`proxy.state.lua.TAKE`); this module is the local backend and the fallback
while Redis is unavailable. Both containers are bounded (LRU), so a flood of distinct keys
(callers) costs a fixed amount of memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

__all__ = ["MAX_KEYS", "LocalBuckets", "QuotaBoard", "Snapshot", "refill"]

MAX_KEYS: Final = 10_000  # buckets (or quota snapshots) kept; the least recently used go first

Snapshot = dict[str, float | int | str]


def refill(tokens: float, elapsed: float, rps: float, burst: float) -> float:
    """Tokens after `elapsed` seconds: min(burst, tokens + elapsed × rps); time never runs
    backwards (a negative elapsed adds nothing)."""
    return min(burst, tokens + max(0.0, elapsed) * rps)


class LocalBuckets:
    """Token buckets by key, in this process only. A new key starts full."""

    __slots__ = ("_buckets", "_max_keys")

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key → [tokens, stamp]
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self, key: str, now: float, rps: float, burst: float, cost: float = 1.0
    ) -> tuple[bool, float]:
        """(allowed, retry_after_seconds) for taking `cost` tokens at monotonic time `now`."""
        rps = max(rps, 1e-9)  # a zero rate would never refill: treat as "very slow"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [burst, now]
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        tokens = refill(bucket[0], now - bucket[1], rps, burst)
        bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return True, 0.0
        bucket[0] = tokens
        return False, (cost - tokens) / rps

    def clear(self) -> None:
        self._buckets.clear()


class QuotaBoard:
    """Quota snapshots by key, each until its own expiry (monotonic seconds)."""

    __slots__ = ("_entries", "_max_keys")

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._entries: OrderedDict[str, tuple[float, Snapshot]] = OrderedDict()
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, snapshot: Snapshot, ttl: float, now: float) -> None:
        if not math.isfinite(ttl) or ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (now + ttl, dict(snapshot))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)

    def get(self, key: str, now: float) -> Snapshot | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key]
            return None
        return dict(entry[1])

"""Local rate limits (DESIGN §14): token buckets, per route or per caller.

A bucket holds up to `burst` tokens and gains `rps` per second; a request takes one or is
refused with the seconds until one is there. So over any interval T at most
`burst + rps × T` requests pass. Callers are kept in an LRU of `max_callers` buckets: an
evicted caller comes back with a full bucket, which is the price of bounded memory.
Time is passed in (monotonic seconds).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["CallerBuckets", "TokenBucket"]


class TokenBucket:
    __slots__ = ("burst", "rps", "stamp", "tokens")

    def __init__(self, rps: float, burst: float, now: float) -> None:
        self.rps = rps
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """0.0 when `cost` tokens were taken, else seconds until they will be there."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rps)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rps

    def update(self, rps: float, burst: float) -> None:
        self.rps = rps
        self.burst = burst
        self.tokens = min(self.tokens, burst)


class CallerBuckets:
    """One bucket per key (the route's, or each caller's), at most `max_callers` kept."""

    __slots__ = ("_buckets", "burst", "max_callers", "rps")

    def __init__(self, rps: float, burst: float, max_callers: int) -> None:
        self.rps = rps
        self.burst = burst
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(self.rps, self.burst, now)
            if len(buckets) > self.max_callers:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket.take(now)

    def update(self, rps: float, burst: float, max_callers: int) -> None:
        self.rps, self.burst, self.max_callers = rps, burst, max_callers
        for bucket in self._buckets.values():
            bucket.update(rps, burst)
        while len(self._buckets) > max_callers:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)

"""The retry budget: retries may add at most a fixed share of load on top of the requests.

A retry is allowed while, over the last `window` seconds,

    retries (this one included) ≤ ratio * requests + min_per_second * window

so a fully failing upstream sees about `1 + ratio` times the request rate instead of
`max_attempts` times, while a quiet route may still retry a few requests per second.
Counts live in per-second buckets of a ring, so eviction is O(1) amortised.
"""

from __future__ import annotations

import math

from proxy.clock import Clock
from proxy.config.model import BudgetPolicy

__all__ = ["RetryBudget"]

_EPSILON = 1e-9  # so that 0.1 * 30 requests allows 3 retries despite float rounding


class RetryBudget:
    """Per-route retry budget; `record_request` per request, `try_acquire` per retry."""

    __slots__ = (
        "_clock",
        "_head",
        "_policy",
        "_requests",
        "_retries",
        "_size",
        "_total_requests",
        "_total_retries",
    )

    def __init__(self, policy: BudgetPolicy, clock: Clock) -> None:
        self._clock = clock
        self._policy = policy
        self._size = 0
        self._requests: list[int] = []
        self._retries: list[int] = []
        self._total_requests = 0
        self._total_retries = 0
        self._head = 0
        self._resize(_bucket_count(policy.window))

    @property
    def policy(self) -> BudgetPolicy:
        return self._policy

    def _resize(self, size: int) -> None:
        self._size = size
        self._requests = [0] * size
        self._retries = [0] * size
        self._total_requests = 0
        self._total_retries = 0
        self._head = math.floor(self._clock.now())

    def _roll(self) -> int:
        """Evict buckets older than the window; return the slot for the current second."""
        second = math.floor(self._clock.now())
        if second > self._head:
            # The slots of the seconds passed over still hold counts from one window ago:
            # subtract and clear them (all of them, at most, when a whole window passed).
            for s in range(max(self._head + 1, second - self._size + 1), second + 1):
                slot = s % self._size
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._head = second
        return second % self._size

    def record_request(self) -> None:
        """Count a request that reached the retry stage (its first attempt)."""
        slot = self._roll()
        self._requests[slot] += 1
        self._total_requests += 1

    def allowance(self) -> float:
        """Retries permitted in the current window: ratio * requests + min_per_second * window."""
        self._roll()
        p = self._policy
        return p.ratio * self._total_requests + p.min_per_second * p.window

    def try_acquire(self) -> bool:
        """Take one retry from the budget if it allows one; the retry is counted when allowed."""
        slot = self._roll()
        p = self._policy
        allowance = p.ratio * self._total_requests + p.min_per_second * p.window
        if self._total_retries + 1 > allowance + _EPSILON:
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def release(self) -> None:
        """Give back a retry taken by `try_acquire` whose attempt sent nothing (every target
        refused it): a refusal costs no budget. Taken from the current second's bucket, else
        the one before (the acquire was moments ago)."""
        slot = self._roll()
        if self._retries[slot] == 0:
            slot = (slot - 1) % self._size
        if self._retries[slot] > 0:
            self._retries[slot] -= 1
            self._total_retries -= 1

    @property
    def requests(self) -> int:
        """Requests counted in the current window."""
        self._roll()
        return self._total_requests

    @property
    def retries(self) -> int:
        """Retries counted in the current window."""
        self._roll()
        return self._total_retries

    def update_policy(self, policy: BudgetPolicy) -> None:
        """Apply a reloaded policy: new ratio and floor at once; counts are kept unless the
        window's size (its number of one-second buckets) changed."""
        size = _bucket_count(policy.window)
        self._policy = policy
        if size != self._size:
            self._resize(size)


def _bucket_count(window: float) -> int:
    """One bucket per started second of the window, at least one."""
    return max(1, math.ceil(window))

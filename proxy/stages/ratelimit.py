"""Rate-limit stage, the outermost (DESIGN §6, §14): a token per request, or a 429.

Its refusal is the caller's own answer (`rate-limited`, with Retry-After) and is never
replaced by a fallback. With `shared: true` the token comes from the fleet state backend
(one atomic round trip; the backend answers from a local bucket at rps ÷ N while Redis is
unavailable); otherwise from this process's buckets. Caller keys are hashed, so neither
memory nor Redis ever holds a header value.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from proxy.clock import Clock
from proxy.config.model import RateLimitPolicy
from proxy.stages.call import Call, Result, Stage
from proxy.state.bucket import LocalBuckets


class SharedBuckets(Protocol):
    """The part of the fleet state backend this stage uses (proxy.state.StateBackend)."""

    async def take(
        self, key: str, rps: float, burst: float, cost: int = 1
    ) -> tuple[bool, float]: ...


def caller_key(value: str) -> str:
    """A fixed-size, non-reversible key for a caller's header value."""
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


class RateLimitStage(Stage):
    __slots__ = ("buckets", "clock", "header", "policy", "route", "shared")

    def __init__(
        self,
        next_stage: Stage,
        route: str,
        policy: RateLimitPolicy,
        buckets: LocalBuckets,
        clock: Clock,
        shared: SharedBuckets | None = None,
    ) -> None:
        super().__init__(next_stage)
        self.route = route
        self.policy = policy
        self.buckets = buckets
        self.clock = clock
        self.header = policy.per_header
        self.shared = shared if policy.shared else None

    async def __call__(self, call: Call) -> Result:
        key = ""
        if self.header is not None:
            value = call.request_headers.get(self.header)
            key = "" if value is None else caller_key(value)
        shared = self.shared
        policy = self.policy
        if shared is not None:
            allowed, wait = await shared.take(f"rl:{self.route}:{key}", policy.rps, policy.burst)
            source = "shared"
        else:
            allowed, wait = self.buckets.take(key, self.clock.now(), policy.rps, policy.burst)
            source = "local"
        if not allowed:
            call.record.rate_limited = source
            return Result(failure="rate-limited", retry_after=wait)
        assert self.next is not None
        return await self.next(call)

"""Resilience decisions, pure and synchronous (DESIGN §6): no I/O, time and randomness injected.

- `backoff`: retry delays (exponential, jittered) and server-requested waits.
- `classify`: an attempt's outcome (`Attempt`), retry matching and the retry decision.
- `budget`: the per-route retry budget.
- `windows`: sliding windows of outcomes (per-second buckets or last N calls).
- `breaker`: the circuit breaker state machine.
- `bulkhead`: the concurrency limit with a FIFO queue (asyncio waiting, no I/O).
- `statefile`: breaker state saved to and restored from disk.

The async pipeline stages in `proxy.stages` wrap these.
"""

from proxy.resilience.backoff import backoff_delay, server_wait
from proxy.resilience.breaker import Breaker, BreakerState, Permit
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.classify import (
    Attempt,
    AttemptResult,
    RetryDecision,
    decide_retry,
    retry_reason,
    retry_wait,
)

__all__ = [
    "Attempt",
    "AttemptResult",
    "Breaker",
    "BreakerState",
    "Bulkhead",
    "Permit",
    "RetryBudget",
    "RetryDecision",
    "backoff_delay",
    "decide_retry",
    "retry_reason",
    "retry_wait",
    "server_wait",
]

"""The one place that declares the order of a route's stages (DESIGN §6):

    rate limit → fallback → total timeout → retry → quota → breaker → bulkhead
    → attempt timeout → upstream

Only the stages a route enables are built; the chain is folded inner to outer once per
config snapshot, so a request pays for what its route uses and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.cache import FallbackStore
from proxy.clock import Clock, Rng
from proxy.config.model import Route
from proxy.observe.events import EventBus
from proxy.resilience.breaker import Breaker
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.ratelimit import CallerBuckets
from proxy.stages.attempt import AttemptStage
from proxy.stages.breaker import BreakerStage
from proxy.stages.bulkhead import BulkheadStage
from proxy.stages.call import Stage
from proxy.stages.fallback import FallbackStage
from proxy.stages.quota import QuotaStage, QuotaState
from proxy.stages.ratelimit import RateLimitStage, SharedBuckets
from proxy.stages.retry import RetryStage
from proxy.stages.timeout import TotalTimeoutStage
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class RouteState:
    """The stateful objects a route's stages use; they outlive config snapshots."""

    client: UpstreamClient
    breaker: Breaker | None
    bulkhead: Bulkhead | None
    budget: RetryBudget | None
    store: FallbackStore
    quota: QuotaState | None = None  # per upstream (the provider meters the credential)
    buckets: CallerBuckets | None = None  # the route's local rate-limit buckets
    shared: SharedBuckets | None = None  # the fleet state backend, for shared: true


# Outermost first. Each entry: (name, builder or None when the route does not enable it).
StageBuilder = Callable[[Stage, Route, RouteState, Clock, Rng, EventBus], Stage | None]


def _rate_limit(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    if route.rate_limit is None or st.buckets is None:
        return None
    return RateLimitStage(inner, route.name, route.rate_limit, st.buckets, clock, st.shared)


def _fallback(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    return FallbackStage(inner, route, st.store) if route.fallback is not None else None


def _total(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    return TotalTimeoutStage(inner, route.timeout.total, clock)


def _retry(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    if route.retry is None or st.budget is None or route.retry.max_attempts <= 1:
        return None
    return RetryStage(inner, route.name, route.retry, st.budget, clock, rng, bus)


def _quota(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    return QuotaStage(inner, st.quota, clock) if st.quota is not None else None


def _breaker(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    return BreakerStage(inner, st.breaker) if st.breaker is not None else None


def _bulkhead(
    inner: Stage, route: Route, st: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> Stage | None:
    return BulkheadStage(inner, st.bulkhead, clock) if st.bulkhead is not None else None


ORDER: tuple[tuple[str, StageBuilder], ...] = (
    ("rate_limit", _rate_limit),
    ("fallback", _fallback),
    ("total_timeout", _total),
    ("retry", _retry),
    ("quota", _quota),
    ("breaker", _breaker),
    ("bulkhead", _bulkhead),
)


def build_pipeline(
    route: Route, state: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> tuple[Stage, tuple[str, ...]]:
    """Fold the enabled stages around the attempt stage; return it and the stage names."""
    stage: Stage = AttemptStage(route, state.client, clock)
    names = ["attempt"]
    for name, build in reversed(ORDER):
        wrapped = build(stage, route, state, clock, rng, bus)
        if wrapped is not None:
            stage = wrapped
            names.append(name)
    return stage, tuple(reversed(names))

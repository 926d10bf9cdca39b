"""The one place that declares the order of a route's stages (DESIGN §6, §16):

    route:   rate limit → fallback → total timeout → retry → failover
    target:  quota → breaker → bulkhead → attempt timeout → upstream

The route stages run once per request; the target chain once per attempt, and a route
with `failover` has one chain per target (its own breaker, bulkhead and upstream client),
with the failover stage choosing the chain of each attempt. A route without `failover`
has one chain and no failover stage, exactly as before: it pays nothing for the feature.

Only the stages a route enables are built; the chains are folded inner to outer once per
config snapshot, so a request pays for what its route uses and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.cache import FallbackStore
from proxy.clock import Clock, Rng
from proxy.config.model import Route, Upstream
from proxy.observe.causes import FailureLog
from proxy.observe.events import EventBus
from proxy.resilience.breaker import Breaker
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.server.forwarding import HeaderPlan
from proxy.stages.attempt import AttemptStage
from proxy.stages.breaker import BreakerStage
from proxy.stages.bulkhead import BulkheadStage
from proxy.stages.call import Stage
from proxy.stages.failover import FailoverStage, Serving
from proxy.stages.fallback import FallbackStage
from proxy.stages.quota import QuotaStage, QuotaState
from proxy.stages.ratelimit import RateLimitStage, SharedBuckets
from proxy.stages.retry import RetryStage
from proxy.stages.timeout import TotalTimeoutStage
from proxy.state.bucket import LocalBuckets
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class TargetState:
    """The stateful objects of one target of a route (DESIGN §2: keyed (route, upstream))."""

    upstream: Upstream
    client: UpstreamClient
    breaker: Breaker | None
    bulkhead: Bulkhead | None
    quota: QuotaState | None = None  # per upstream (the provider meters the credential)


@dataclass(frozen=True, slots=True)
class RouteState:
    """The stateful objects a route's stages use; they outlive config snapshots.

    `targets[0]` is the route's upstream; a failover route has one per target, in order.
    """

    targets: tuple[TargetState, ...]
    budget: RetryBudget | None
    store: FallbackStore
    serving: Serving

    @property
    def client(self) -> UpstreamClient:
        return self.targets[0].client

    @property
    def breaker(self) -> Breaker | None:
        return self.targets[0].breaker

    @property
    def bulkhead(self) -> Bulkhead | None:
        return self.targets[0].bulkhead

    failures: FailureLog | None = None  # failure causes: rate-limited warnings, last cause
    buckets: LocalBuckets | None = None  # the route's local rate-limit buckets
    shared: SharedBuckets | None = None  # the fleet state backend, for shared: true


# Each entry: (name, builder returning the wrapped stage, or None when the route does not
# enable it). Route stages wrap the whole request, target stages one target's attempt.
RouteBuilder = Callable[[Stage, Route, RouteState, Clock, Rng, EventBus], Stage | None]
TargetBuilder = Callable[[Stage, Route, TargetState, Clock], Stage | None]


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
    if not _retries(route) or st.budget is None:
        return None
    assert route.retry is not None
    return RetryStage(inner, route.name, route.retry, st.budget, clock, rng, bus)


def _retries(route: Route) -> bool:
    return route.retry is not None and route.retry.max_attempts > 1


def _quota(inner: Stage, route: Route, target: TargetState, clock: Clock) -> Stage | None:
    if target.quota is None:
        return None
    # On a failover route whose `on` lists quota, a spent target is skipped at once (the
    # next target may answer now) rather than waited for; the last target still waits.
    last = route.targets[-1].name == target.upstream.name
    skips = route.failover is not None and "quota" in route.failover.conditions and not last
    return QuotaStage(inner, target.quota, clock, waits=not skips)


def _breaker(inner: Stage, route: Route, target: TargetState, clock: Clock) -> Stage | None:
    return BreakerStage(inner, target.breaker) if target.breaker is not None else None


def _bulkhead(inner: Stage, route: Route, target: TargetState, clock: Clock) -> Stage | None:
    return BulkheadStage(inner, target.bulkhead, clock) if target.bulkhead is not None else None


# Outermost first.
ROUTE_ORDER: tuple[tuple[str, RouteBuilder], ...] = (
    # First: its 429 is the caller's answer and never replaced by a fallback (DESIGN §14).
    ("rate_limit", _rate_limit),
    ("fallback", _fallback),
    ("total_timeout", _total),
    ("retry", _retry),
)
# Then, on a route with `failover` only, the failover stage: it picks each attempt's target.
FAILOVER = "failover"
TARGET_ORDER: tuple[tuple[str, TargetBuilder], ...] = (
    # First: a quota refusal sends nothing, so a failover route skips the target at no cost
    # (DESIGN §16).
    ("quota", _quota),
    ("breaker", _breaker),
    ("bulkhead", _bulkhead),
)
# The whole declared order, for tests and `/status`.
ORDER: tuple[str, ...] = (
    *(name for name, _ in ROUTE_ORDER),
    FAILOVER,
    *(name for name, _ in TARGET_ORDER),
    "attempt",
)


def build_target(
    route: Route,
    index: int,
    target: TargetState,
    clock: Clock,
    failures: FailureLog | None = None,
) -> tuple[Stage, tuple[str, ...]]:
    """One target's chain: the enabled target stages folded around its attempt stage."""
    plan = HeaderPlan.for_upstream(target.upstream) if index else None
    stage: Stage = AttemptStage(route, target.client, clock, index, plan, failures)
    names = ["attempt"]
    for name, build in reversed(TARGET_ORDER):
        wrapped = build(stage, route, target, clock)
        if wrapped is not None:
            stage = wrapped
            names.append(name)
    return stage, tuple(reversed(names))


def build_pipeline(
    route: Route, state: RouteState, clock: Clock, rng: Rng, bus: EventBus
) -> tuple[Stage, tuple[str, ...]]:
    """Fold the enabled stages around the target chain(s); return it and the stage names."""
    chains = [build_target(route, i, t, clock, state.failures) for i, t in enumerate(state.targets)]
    stage, target_names = chains[0]
    names = list(reversed(target_names))
    if route.failover is not None and len(chains) > 1:
        stage = FailoverStage(
            tuple(chain for chain, _ in chains),
            tuple(t.upstream.name for t in state.targets),
            route.name,
            route.failover,
            route.retry,
            clock,
            bus,
            state.serving,
            tuple(_admits(target) for target in state.targets),
            walks=not (_retries(route) and state.budget is not None),
        )
        names.append(FAILOVER)
    for name, build in reversed(ROUTE_ORDER):
        wrapped = build(stage, route, state, clock, rng, bus)
        if wrapped is not None:
            stage = wrapped
            names.append(name)
    return stage, tuple(reversed(names))


def _admits(target: TargetState) -> Callable[[], bool]:
    """Whether the target's own refusing stages would let an attempt through now: its
    breaker, and its quota as seen by the shared partition (the check has no request)."""
    breaker, quota = target.breaker, target.quota
    if quota is None:
        return breaker.admits if breaker is not None else _always
    if breaker is None:
        return quota.admits
    return lambda: breaker.admits() and quota.admits()


def _always() -> bool:
    return True


def target_route(route: Route, index: int) -> Route:
    """The route as one of its targets sees it (for rewriting `Location` and `Link`)."""
    return route if index == 0 else replace(route, upstream=route.targets[index])

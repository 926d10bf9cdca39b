"""Compiled snapshots and the state registry that outlives them (DESIGN §2).

A `Runtime` is what one config compiles into: per route its matcher data, its pipeline and
its pre-bound metric children. The `Registry` keeps the stateful objects (breakers,
bulkheads, budgets, upstream pools) keyed by (route, upstream); a reload updates their
policies in place, and drops the state of removed routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from proxy.cache import FallbackStore
from proxy.clock import Clock, Rng
from proxy.config.model import Config, RetryPolicy, Route, Upstream
from proxy.headers import VIA_VALUE
from proxy.observe.access import AccessLog
from proxy.observe.causes import FailureLog
from proxy.observe.events import EventBus
from proxy.observe.metrics import BreakerView, Metrics, RouteMetrics
from proxy.resilience.breaker import Breaker
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.server.forwarding import HeaderPlan
from proxy.stages.call import Stage
from proxy.stages.failover import Serving
from proxy.stages.pipeline import RouteState, TargetState, build_pipeline, target_route
from proxy.stages.quota import QuotaState
from proxy.state import LocalBackend, StateBackend
from proxy.state.bucket import LocalBuckets
from proxy.upstream import UpstreamClient

# Request bodies up to this are buffered on a failover route without a retry block, so a
# hop to the next target can replay them (retry.max_body's default).
FAILOVER_REPLAY_BODY = RetryPolicy().max_body


@dataclass(frozen=True, slots=True)
class RouteRuntime:
    route: Route
    name: str
    prefix: str  # path_prefix without its trailing slash ("" for "/")
    host: str | None
    host_has_port: bool
    methods: frozenset[str] | None
    pipeline: Stage
    stages: tuple[str, ...]
    metrics: RouteMetrics
    retry_enabled: bool
    state: RouteState
    header_plan: HeaderPlan
    # Per target (index 0: the route's upstream), for the response side: the route as that
    # target sees it (Location rewriting) and its name (X-Resilience-Upstream).
    target_routes: tuple[Route, ...]
    target_names: tuple[str, ...]
    failover: bool  # the route has more than one target
    idempotency_header: str | None  # lower-case; None: no retry or failover to unlock
    replay_body: int  # request bodies up to this are buffered for replay
    # Per target: the response header lines every answer from it ends with (Via, and
    # on a failover route X-Resilience-Upstream), built once here.
    head_suffixes: tuple[bytes, ...]
    # The upstream path is `path_base + "/" + path[strip:].lstrip("/")` (DESIGN §5).
    path_base: str = ""
    strip: int = 0

    def matches(self, path: str, host: str, method: str) -> bool:
        prefix = self.prefix  # segment-wise: /api (or /api/) matches /api and /api/x, not /apix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None:
            wanted = host.lower() if self.host_has_port else _strip_port(host.lower())
            if wanted != self.host:
                return False
        return True


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    routes: tuple[RouteRuntime, ...]
    loaded_at: float  # wall time
    access: AccessLog | None = None  # None: access_log disabled, no work per request
    # The routes that can match a path, by the path's first segment, in config order (a
    # route whose prefix is "/" is a candidate everywhere); `_anywhere` for other segments.
    _by_segment: dict[str, tuple[RouteRuntime, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _anywhere: tuple[RouteRuntime, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        anywhere = tuple(rt for rt in self.routes if not rt.prefix)
        segments = {_first_segment(rt.prefix) for rt in self.routes if rt.prefix}
        index = {
            seg: tuple(
                rt for rt in self.routes if not rt.prefix or _first_segment(rt.prefix) == seg
            )
            for seg in segments
        }
        object.__setattr__(self, "_by_segment", index)
        object.__setattr__(self, "_anywhere", anywhere)

    def match(self, path: str, host: str, method: str) -> RouteRuntime | None:
        """The first route in config order that matches (only the candidates for the
        path's first segment are tried: one dict lookup, then usually one route)."""
        end = path.find("/", 1)
        segment = path[1:] if end < 0 else path[1:end]
        for rt in self._by_segment.get(segment, self._anywhere):
            if rt.matches(path, host, method):
                return rt
        return None


def _first_segment(prefix: str) -> str:
    """`/api/v1` → `api` (prefixes start with "/", trailing slash already stripped)."""
    return prefix[1:].partition("/")[0]


class Registry:
    """Stateful objects keyed by (route, upstream), kept across reloads."""

    def __init__(self, clock: Clock, bus: EventBus, store: FallbackStore) -> None:
        self.clock = clock
        self.bus = bus
        self.store = store
        self.breakers: dict[tuple[str, str], Breaker] = {}
        self.bulkheads: dict[tuple[str, str], Bulkhead] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self.serving: dict[str, Serving] = {}
        self.clients: dict[str, UpstreamClient] = {}
        self.quotas: dict[str, QuotaState] = {}  # per upstream with `quota`
        # per route with `rate_limit`: (max_callers, its buckets)
        self.buckets: dict[str, tuple[int, LocalBuckets]] = {}
        self.failures = FailureLog(clock)
        # The fleet state backend (DESIGN §15); the app sets the configured one and swaps it
        # on a reload that changes `state`, before the new runtime is compiled.
        self.state: StateBackend = LocalBackend(clock)
        self._retired: list[UpstreamClient] = []
        self._closers: set[asyncio.Task[None]] = set()

    def client_for(self, upstream: Upstream) -> UpstreamClient:
        client = self.clients.get(upstream.name)
        if client is not None and client.upstream != upstream:
            self._retire(client)
            client = None
        if client is None:
            client = self.clients[upstream.name] = UpstreamClient(upstream, self.clock)
        return client

    def target_for(self, route: Route, upstream: Upstream) -> TargetState:
        """One target's breaker and bulkhead, keyed (route, upstream), and its pool."""
        key = (route.name, upstream.name)
        breaker = None
        if route.breaker is not None:
            breaker = self.breakers.get(key)
            if breaker is None:
                breaker = self.breakers[key] = Breaker(
                    route.name, upstream.name, route.breaker, self.clock, self.bus.emit
                )
            else:
                breaker.update_policy(route.breaker)
        bulkhead = None
        if route.bulkhead is not None:
            bulkhead = self.bulkheads.get(key)
            if bulkhead is None:
                bulkhead = self.bulkheads[key] = Bulkhead(route.bulkhead, self.clock)
            else:
                bulkhead.update_policy(route.bulkhead)
        return TargetState(
            upstream, self.client_for(upstream), breaker, bulkhead, self.quota_for(upstream)
        )

    def quota_for(self, upstream: Upstream) -> QuotaState | None:
        """The upstream's quota state: per upstream, shared by every route and target that
        sends to it (the provider meters the credential, not the route)."""
        policy = upstream.quota
        if policy is None:
            return None
        state = self.quotas.get(upstream.name)
        if state is None:
            state = self.quotas[upstream.name] = QuotaState(upstream, policy, self.clock)
        else:
            state.update(upstream, policy)
        backend = self.state
        state.backend = backend if backend.name != "local" else None
        return state

    def buckets_for(self, route: Route) -> LocalBuckets | None:
        """The route's local buckets (one, or one per caller, at most max_callers); a changed
        rps or burst applies from the next take, a changed max_callers starts afresh."""
        policy = route.rate_limit
        if policy is None:
            return None
        kept = self.buckets.get(route.name)
        if kept is None or kept[0] != policy.max_callers:
            kept = self.buckets[route.name] = (policy.max_callers, LocalBuckets(policy.max_callers))
        return kept[1]

    def state_for(self, route: Route) -> RouteState:
        targets = tuple(self.target_for(route, upstream) for upstream in route.targets)
        serving = self.serving.get(route.name)
        if serving is None:
            serving = self.serving[route.name] = Serving()
        budget = None
        if route.retry is not None:
            budget = self.budgets.get(route.name)
            if budget is None:
                budget = self.budgets[route.name] = RetryBudget(route.retry.budget, self.clock)
            else:
                budget.update_policy(route.retry.budget)
        return RouteState(
            targets,
            budget,
            self.store,
            serving,
            self.failures,
            buckets=self.buckets_for(route),
            shared=self.state,
        )

    def prune(self, config: Config) -> None:
        """Drop the state of routes, targets and upstreams the new config no longer has."""
        keys = {(r.name, upstream.name) for r in config.routes for upstream in r.targets}
        for key in [k for k in self.breakers if k not in keys]:
            del self.breakers[key]
        for key in [k for k in self.bulkheads if k not in keys]:
            del self.bulkheads[key]
        names = {r.name for r in config.routes if r.retry is not None}
        for name in [n for n in self.budgets if n not in names]:
            del self.budgets[name]
        routes = {r.name for r in config.routes}
        for name in [n for n in self.serving if n not in routes]:
            del self.serving[name]
        limited = {r.name for r in config.routes if r.rate_limit is not None}
        for name in [n for n in self.buckets if n not in limited]:
            del self.buckets[name]
        metered = {u.name for r in config.routes for u in r.targets if u.quota is not None}
        for name in [n for n in self.quotas if n not in metered]:
            self.quotas.pop(name).close()
        for name in {k[0] for k in self.failures.latest} - {r.name for r in config.routes}:
            self.failures.forget_route(name)
        for name in [n for n in self.clients if n not in config.upstreams]:
            self._retire(self.clients.pop(name))

    def _retire(self, client: UpstreamClient) -> None:
        """Close a replaced pool once its in-flight attempts are done."""
        task = asyncio.get_running_loop().create_task(self._close_when_idle(client))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close_when_idle(self, client: UpstreamClient) -> None:
        while client.in_flight > 0 or client.streaming > 0:
            await self.clock.sleep(0.5)
        await client.close()

    async def close(self) -> None:
        for task in list(self._closers):
            task.cancel()
        for quota in self.quotas.values():
            quota.close()  # no quota waiter or snapshot writer outlives the app
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()

    def iter_breakers(self) -> Iterator[BreakerView]:
        for (route, upstream), breaker in self.breakers.items():
            state = breaker.reported_state()
            yield BreakerView(route, upstream, state.value, breaker.opened_at_wall())

    def iter_quotas(self) -> Iterator[tuple[str, dict[str, float | int | None]]]:
        now = self.clock.now()
        for name, state in self.quotas.items():
            summary = state.tracker.summary(now)
            summary["queued"] = state.queued
            yield name, summary

    def iter_bulkheads(self) -> Iterator[tuple[str, str, int, int]]:
        for (route, upstream), bulkhead in self.bulkheads.items():
            yield route, upstream, bulkhead.in_flight, bulkhead.queued


def _head_suffix(upstream: str | None) -> bytes:
    lines = f"Via: {VIA_VALUE}\r\n"
    if upstream is not None:
        lines += f"X-Resilience-Upstream: {upstream}\r\n"
    return lines.encode()


def compile_runtime(
    config: Config,
    registry: Registry,
    metrics: Metrics,
    clock: Clock,
    rng: Rng,
    bus: EventBus,
) -> Runtime:
    routes = []
    for route in config.routes:
        state = registry.state_for(route)
        pipeline, names = build_pipeline(route, state, clock, rng, bus)
        host = route.match.host
        targets = route.targets
        failover = "failover" in names
        retry = route.retry
        idempotency = retry.idempotency_header if retry is not None else None
        if retry is None and failover:
            idempotency = RetryPolicy().idempotency_header
        replay = retry.max_body if retry is not None else 0
        if retry is None and failover:
            replay = FAILOVER_REPLAY_BODY
        routes.append(
            RouteRuntime(
                route=route,
                name=route.name,
                prefix=route.match.path_prefix.rstrip("/"),
                host=host,
                host_has_port=host is not None and _strip_port(host) != host,
                methods=route.match.methods,
                pipeline=pipeline,
                stages=names,
                metrics=metrics.route(route.name, *(t.name for t in targets)),
                retry_enabled="retry" in names,
                state=state,
                header_plan=HeaderPlan.for_upstream(route.upstream),
                target_routes=tuple(target_route(route, i) for i in range(len(targets))),
                target_names=tuple(t.name for t in targets),
                failover=failover,
                idempotency_header=idempotency,
                replay_body=replay,
                head_suffixes=tuple(_head_suffix(t.name if failover else None) for t in targets),
                path_base=route.upstream.base_path.rstrip("/"),
                strip=len(route.match.path_prefix.rstrip("/")) if route.strip_prefix else 0,
            )
        )
    registry.prune(config)
    access = AccessLog.build(config.access_log, rng)
    return Runtime(config, tuple(routes), clock.wall(), access)

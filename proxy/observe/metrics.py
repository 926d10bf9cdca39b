"""Every Prometheus metric the proxy exports, declared in this one module (DESIGN §9).

Per request, the pipeline fills one `RequestRecord` and `RouteMetrics.observe` turns it into
metric updates through children bound once per route at config compile time. State changes
arrive as events (`on_event`). Gauges that mirror live state (breakers, bulkheads, cache,
Postgres) are read at scrape time by a collector, so the request path never touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.observe.events import (
    BreakerRejected,
    BreakerTransitioned,
    ConfigReloaded,
    Event,
    FailedOver,
    PgProbed,
)

PREFIX = "resilience_proxy_"

# 1ms … 900s, as DESIGN §9 asks.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
)

STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)

BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "forced_closed", "disabled")
PG_STATUSES = ("unknown", "ok", "degraded", "critical")
RATE_LIMIT_SOURCES = ("local", "shared", "quota", "upstream")
RETRY_CALL_KINDS = (
    "successful_without_retry",
    "successful_with_retry",
    "failed_without_retry",
    "failed_with_retry",
)


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else "OTHER"


class RequestRecord:
    """What one request did, filled by the stages and observed once at the end."""

    __slots__ = (
        "attempts",
        "budget_exhausted",
        "code",
        "method",
        "outcome",
        "rate_limited",
        "retries",
        "target",
    )

    def __init__(self, method: str) -> None:
        self.method = method
        self.code = 0
        self.outcome = "ok"
        # (result label, duration seconds, target index) per upstream attempt; the index
        # is into the route's targets (0: its upstream; then failover's, in order)
        self.attempts: list[tuple[str, float, int]] = []
        self.retries: list[str] = []  # the `on` token behind each retry
        self.budget_exhausted = False
        # rate_limited_total{source}: local | shared (our buckets), quota (our quota gate),
        # upstream (the provider refused for quota); None: not rate-limited
        self.rate_limited: str | None = None
        self.target = 0  # the target of the last attempt (or refusal)


class Metrics:
    """Owns the registry and every metric object."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests_total = Counter(
            p + "requests_total",
            "Requests answered, by route, method, status sent and outcome.",
            ("route", "method", "code", "outcome"),
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from the request head to the response head sent to the client.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.attempts_total = Counter(
            p + "upstream_attempts_total",
            "Upstream attempts, by result.",
            ("route", "upstream", "result"),
            registry=r,
        )
        self.attempt_duration = Histogram(
            p + "upstream_attempt_duration_seconds",
            "Upstream attempt duration until its response head (or failure).",
            ("route", "upstream"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.retries_total = Counter(
            p + "retries_total",
            "Retries taken, by the condition that caused them.",
            ("route", "reason"),
            registry=r,
        )
        self.retry_calls_total = Counter(
            p + "retry_calls_total",
            "Requests through a retry stage, by whether they succeeded and were retried.",
            ("route", "kind"),
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            p + "retry_budget_exhausted_total",
            "Retries refused by the retry budget.",
            ("route",),
            registry=r,
        )
        self.breaker_transitions = Counter(
            p + "breaker_transitions_total",
            "Circuit breaker state transitions.",
            ("route", "upstream", "from_state", "to_state"),
            registry=r,
        )
        self.breaker_rejected = Counter(
            p + "breaker_rejected_total",
            "Attempts rejected by an open circuit breaker.",
            ("route", "upstream"),
            registry=r,
        )
        self.bulkhead_rejected = Counter(
            p + "bulkhead_rejected_total",
            "Attempts rejected by a full bulkhead.",
            ("route", "upstream"),
            registry=r,
        )
        self.fallbacks_total = Counter(
            p + "fallbacks_total",
            "Fallback responses served, by kind.",
            ("route", "kind"),
            registry=r,
        )
        self.rate_limited_total = Counter(
            p + "rate_limited_total",
            "Requests refused for rate or quota, by who refused: local or shared rate limit, "
            "the quota gate, or the upstream itself.",
            ("route", "source"),
            registry=r,
        )
        self.failovers_total = Counter(
            p + "failovers_total",
            "Attempts sent to another target of a failover route, by the reason.",
            ("route", "from_upstream", "to_upstream", "reason"),
            registry=r,
        )
        self.cache_evictions = Counter(
            p + "cache_evictions_total",
            "Fallback entries evicted to stay within max_bytes.",
            registry=r,
        )
        self._evictions_seen = 0
        self.config_reloads = Counter(
            p + "config_reloads_total",
            "Configuration reloads, by result.",
            ("result",),
            registry=r,
        )
        self.pg_probe_duration = Histogram(
            p + "pg_probe_duration_seconds",
            "Postgres probe duration (acquire + query).",
            ("target",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.pg_probe_failures = Counter(
            p + "pg_probe_failures_total",
            "Failed Postgres probes, by reason.",
            ("target", "reason"),
            registry=r,
        )
        for result in ("ok", "error", "unchanged"):
            self.config_reloads.labels(result)
        self._recent: dict[str, dict[str, RecentCounter]] = {}
        self.live = LiveState()
        r.register(_LiveCollector(self.live))

    def recent_for(self, route: str) -> dict[str, RecentCounter]:
        """Last-minute counters per route, kept across reloads like the metrics themselves."""
        counters = self._recent.get(route)
        if counters is None:
            counters = self._recent[route] = {
                name: RecentCounter() for name in ("requests", "retries", "fallbacks", "failures")
            }
        return counters

    def route(self, route: str, upstream: str, *failover: str) -> RouteMetrics:
        """Children for a route; `failover` names its other targets, in order."""
        return RouteMetrics(self, route, upstream, failover)

    def on_event(self, event: Event) -> None:
        if isinstance(event, BreakerTransitioned):
            self.breaker_transitions.labels(
                event.route, event.upstream, event.from_state, event.to_state
            ).inc()
        elif isinstance(event, BreakerRejected):
            self.breaker_rejected.labels(event.route, event.upstream).inc()
        elif isinstance(event, FailedOver):
            self.failovers_total.labels(
                event.route, event.from_upstream, event.to_upstream, event.reason
            ).inc()
        elif isinstance(event, ConfigReloaded):
            self.config_reloads.labels(event.result).inc()
        elif isinstance(event, PgProbed):
            self.pg_probe_duration.labels(event.target).observe(event.duration)
            if not event.ok:
                self.pg_probe_failures.labels(event.target, event.reason or "other").inc()

    def sync_cache_evictions(self, total: int) -> None:
        """The store counts evictions itself; mirror its total into the counter."""
        if total > self._evictions_seen:
            self.cache_evictions.inc(total - self._evictions_seen)
        self._evictions_seen = total


class RecentCounter:
    """Counts over the last 60 seconds in one-second buckets (for the status page)."""

    __slots__ = ("_counts", "_tags")

    def __init__(self) -> None:
        self._counts = [0] * 60
        self._tags = [-1] * 60

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        i = second % 60
        if self._tags[i] != second:
            self._tags[i] = second
            self._counts[i] = 0
        self._counts[i] += n

    def total(self, now: float) -> int:
        low = int(now) - 60
        return sum(c for c, t in zip(self._counts, self._tags, strict=True) if t > low)


class RouteMetrics:
    """Metric children bound once per (route, upstream) when a config is compiled."""

    __slots__ = (
        "_m",
        "_requests",
        "attempt_children",
        "attempt_duration",
        "breaker_rejected",
        "bulkhead_rejected",
        "duration",
        "fallback_stale",
        "fallback_static",
        "rate_limited",
        "recent",
        "retry_budget_exhausted",
        "retry_kinds",
        "route",
        "targets",
        "upstream",
    )

    def __init__(
        self, m: Metrics, route: str, upstream: str, failover: tuple[str, ...] = ()
    ) -> None:
        self._m = m
        self.route = route
        self.upstream = upstream
        self._requests: dict[tuple[str, int, str], Any] = {}
        self.duration = m.request_duration.labels(route)
        self.attempt_duration = m.attempt_duration.labels(route, upstream)
        self.attempt_children = {
            result: m.attempts_total.labels(route, upstream, result)
            for result in ("ok", "status", "timeout", "connect-failure", "reset")
        }
        self.retry_kinds = {
            kind: m.retry_calls_total.labels(route, kind) for kind in RETRY_CALL_KINDS
        }
        self.retry_budget_exhausted = m.retry_budget_exhausted.labels(route)
        self.breaker_rejected = m.breaker_rejected.labels(route, upstream)
        self.bulkhead_rejected = m.bulkhead_rejected.labels(route, upstream)
        # per target (index 0: the primary): attempt results, attempt durations, bulkhead
        targets = [(self.attempt_children, self.attempt_duration, self.bulkhead_rejected)]
        for name in failover:
            children = {
                result: m.attempts_total.labels(route, name, result)
                for result in ("ok", "status", "timeout", "connect-failure", "reset")
            }
            duration = m.attempt_duration.labels(route, name)
            targets.append((children, duration, m.bulkhead_rejected.labels(route, name)))
        self.targets = tuple(targets)
        self.fallback_stale = m.fallbacks_total.labels(route, "stale")
        self.fallback_static = m.fallbacks_total.labels(route, "static")
        self.rate_limited = {
            source: m.rate_limited_total.labels(route, source) for source in RATE_LIMIT_SOURCES
        }
        # requests, retries, fallbacks and failures in the last minute, by name
        self.recent = m.recent_for(route)

    def observe(self, rec: RequestRecord, duration: float, retry_enabled: bool, now: float) -> None:
        method = method_label(rec.method)  # arbitrary client methods must not grow this cache
        key = (method, rec.code, rec.outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._m.requests_total.labels(self.route, method, str(rec.code), rec.outcome)
            self._requests[key] = child
        child.inc()
        self.duration.observe(duration)
        targets = self.targets
        for result, seconds, target in rec.attempts:
            children, histogram, _ = targets[target]
            children[result].inc()
            histogram.observe(seconds)
        recent = self.recent
        recent["requests"].add(now)
        if rec.retries:
            recent["retries"].add(now, len(rec.retries))
            for reason in rec.retries:
                self._m.retries_total.labels(self.route, reason).inc()
        if rec.outcome not in ("ok", "client-cancelled"):
            bucket = "fallbacks" if rec.outcome.startswith("fallback") else "failures"
            recent[bucket].add(now)
        if retry_enabled and rec.attempts:
            ok = rec.outcome in ("ok", "fallback-stale", "fallback-static") and rec.code < 500
            retried = len(rec.attempts) > 1
            kind = ("successful" if ok else "failed") + (
                "_with_retry" if retried else "_without_retry"
            )
            self.retry_kinds[kind].inc()
        if rec.budget_exhausted:
            self.retry_budget_exhausted.inc()
        source = rec.rate_limited
        if source is None and rec.code == 429 and rec.outcome == "upstream-status":
            source = "upstream"
        if source is not None:
            self.rate_limited[source].inc()
        if rec.outcome == "fallback-stale":
            self.fallback_stale.inc()
        elif rec.outcome == "fallback-static":
            self.fallback_static.inc()
        elif rec.outcome == "bulkhead-full":
            targets[rec.target][2].inc()


def observe_unrouted(m: Metrics, method: str, code: int, outcome: str, duration: float) -> None:
    """Requests refused before a route was chosen (no route, bad request): route label ''."""
    m.requests_total.labels("", method_label(method), str(code), outcome).inc()


class LiveState:
    """Callables that report live state at scrape time; set by the app as it (re)builds."""

    def __init__(self) -> None:
        self.breakers: Callable[[], Iterable[tuple[str, str, str]]] = lambda: ()
        self.bulkheads: Callable[[], Iterable[tuple[str, str, int, int]]] = lambda: ()
        self.cache: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.config_hash: Callable[[], str] = lambda: ""
        self.postgres: Callable[[], Iterable[dict[str, Any]]] = lambda: ()
        # (upstream, summary with "remaining" and "reset_seconds", None when unknown)
        self.quotas: Callable[[], Iterable[tuple[str, dict[str, Any]]]] = lambda: ()


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


class _LiveCollector(Collector):
    def __init__(self, live: LiveState) -> None:
        self.live = live

    def describe(self) -> Iterable[Any]:
        return ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        live = self.live
        state = _gauge(
            "breaker_state", "1 for the breaker's current state.", ("route", "upstream", "state")
        )
        for route, upstream, current in live.breakers():
            for s in BREAKER_STATES:
                state.add_metric([route, upstream, s], 1.0 if s == current else 0.0)
        yield state
        in_flight = _gauge("bulkhead_in_flight", "Attempts in flight.", ("route", "upstream"))
        queued = _gauge("bulkhead_queued", "Attempts waiting for a slot.", ("route", "upstream"))
        for route, upstream, n_flight, n_queued in live.bulkheads():
            in_flight.add_metric([route, upstream], n_flight)
            queued.add_metric([route, upstream], n_queued)
        yield in_flight
        yield queued
        entries, size = live.cache()
        yield GaugeMetricFamily(PREFIX + "cache_entries", "Stored fallback entries.", value=entries)
        yield GaugeMetricFamily(PREFIX + "cache_bytes", "Bytes of stored fallbacks.", value=size)
        info = _gauge("config_info", "1, labelled with the live config's hash.", ("hash",))
        config_hash = live.config_hash()
        if config_hash:
            info.add_metric([config_hash], 1.0)
        yield info
        remaining = _gauge(
            "upstream_quota_remaining",
            "The provider's remaining quota (the lowest over credential partitions).",
            ("upstream",),
        )
        reset = _gauge(
            "upstream_quota_reset_seconds",
            "Seconds until that quota resets.",
            ("upstream",),
        )
        for upstream, summary in live.quotas():
            if summary.get("remaining") is not None:
                remaining.add_metric([upstream], float(summary["remaining"]))
            if summary.get("reset_seconds") is not None:
                reset.add_metric([upstream], float(summary["reset_seconds"]))
        yield remaining
        yield reset
        yield from _pg_families(live.postgres())


def _pg_families(snapshots: Iterable[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    up = _gauge("pg_up", "1 when the last probe succeeded.", ("target",))
    status = _gauge("pg_status", "1 for the target's current status.", ("target", "status"))
    pool = _gauge("pg_pool_connections", "The prober pool's connections.", ("target", "state"))
    size = _gauge("pg_pool_size", "The prober pool's current size.", ("target",))
    max_size = _gauge("pg_pool_max_size", "The prober pool's maximum size.", ("target",))
    server = _gauge(
        "pg_server_connections",
        "The agent's connections seen in pg_stat_activity, by state.",
        ("target", "state"),
    )
    util = _gauge("pg_server_utilization", "The agent's pool utilization (0..1).", ("target",))
    failures = _gauge("pg_consecutive_failures", "Consecutive failed probes.", ("target",))
    for snap in snapshots:
        name = str(snap.get("name", ""))
        current = snap.get("status", "unknown")
        up.add_metric([name], 1.0 if snap.get("up") else 0.0)
        for s in PG_STATUSES:
            status.add_metric([name, s], 1.0 if s == current else 0.0)
        own = snap.get("prober_pool") or {}
        pool.add_metric([name, "used"], float(own.get("used", 0) or 0))
        pool.add_metric([name, "idle"], float(own.get("idle", 0) or 0))
        size.add_metric([name], float(own.get("size", 0) or 0))
        max_size.add_metric([name], float(own.get("max_size", 0) or 0))
        srv = snap.get("server") or {}
        for s in ("active", "idle", "idle_in_transaction", "waiting"):
            value = srv.get(s)
            if value is not None:  # unknown before the first good probe: no sample
                server.add_metric([name, s], float(value))
        utilization = snap.get("utilization")
        if utilization is not None:
            util.add_metric([name], float(utilization))
        failures.add_metric([name], float(snap.get("consecutive_failures", 0) or 0))
    yield from (up, status, pool, size, max_size, server, util, failures)

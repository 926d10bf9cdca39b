"""Every Prometheus metric the proxy exports, declared in this one module (DESIGN §9).

Counting and rendering are apart, so the request path never takes a lock:

- Per request, the pipeline fills one `RequestRecord` and `RouteMetrics.observe` adds it to
  plain ints, floats and histogram bucket lists kept per route and per (route, upstream)
  (`_RouteCounts`, `_TargetCounts`). Everything runs on the event loop's one thread, so a
  scrape (on the same loop) always reads a consistent set.
- State changes arrive as events (`Metrics.on_event`) and bump the same kind of counters.
- At scrape time `_Collector` renders them, plus the gauges read from live state (breakers,
  bulkheads, cache, Postgres, credentials), as prometheus-client metric families with the
  names, labels, HELP and bucket boundaries declared in `FAMILIES`.

No `*_created` series exist (nothing here is a prometheus-client `Counter`); the registry
also carries prometheus-client's `process_*` and `python_*` collectors.

Adding a family (other branches: quota, fleet, failover): declare it in `FAMILIES`, keep its
counts in a plain dict on `Metrics` (or read them from live state through a callable on
`LiveState`), and render it in a `_render_*` method listed in `_Collector.collect`.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import __version__, version_info
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.observe.events import (
    BreakerTransitioned,
    ConfigReloaded,
    Event,
    FailedOver,
    PgProbed,
    StateBackendChanged,
    StateBackendErrored,
)
from proxy.observe.history import RouteHistory

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
_LE = (*(floatToGoString(b) for b in DURATION_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]

STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)

BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "forced_closed", "disabled")
PG_STATUSES = ("unknown", "ok", "degraded", "critical")
RATE_LIMIT_SOURCES = ("local", "shared", "quota", "upstream")
ATTEMPT_RESULTS = ("ok", "status", "timeout", "connect-failure", "reset")
RETRY_CALL_KINDS = (
    "successful_without_retry",
    "successful_with_retry",
    "failed_without_retry",
    "failed_with_retry",
)
_NOT_FAILURES = frozenset(("ok", "client-cancelled"))
_GOOD_OUTCOMES = frozenset(("ok", "fallback-stale", "fallback-static"))


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its name without the prefix (counters spelled with `_total`),
    type, HELP text and label names."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()

    def new(self) -> Any:
        full = PREFIX + self.name
        labels = list(self.labels)
        if self.kind == "counter":
            return CounterMetricFamily(full, self.help, labels=labels)
        if self.kind == "histogram":
            return HistogramMetricFamily(full, self.help, labels=labels)
        return GaugeMetricFamily(full, self.help, labels=labels)


def _families(*families: Family) -> dict[str, Family]:
    return {f.name: f for f in families}


FAMILIES = _families(
    # -- per request ---------------------------------------------------------------------
    Family(
        "requests_total",
        "counter",
        "Requests answered, by route, method, status sent and outcome.",
        ("route", "method", "code", "outcome"),
    ),
    Family(
        "request_duration_seconds",
        "histogram",
        "Time from the request head to the response head sent to the client.",
        ("route",),
    ),
    Family(
        "upstream_attempts_total",
        "counter",
        "Upstream attempts, by result.",
        ("route", "upstream", "result"),
    ),
    Family(
        "upstream_attempt_duration_seconds",
        "histogram",
        "Upstream attempt duration until its response head (or failure).",
        ("route", "upstream"),
    ),
    Family(
        "retries_total",
        "counter",
        "Retries taken, by the condition that caused them.",
        ("route", "reason"),
    ),
    Family(
        "retry_calls_total",
        "counter",
        "Requests through a retry stage, by whether they succeeded and were retried.",
        ("route", "kind"),
    ),
    Family(
        "retry_budget_exhausted_total",
        "counter",
        "Retries refused by the retry budget.",
        ("route",),
    ),
    Family(
        "breaker_rejected_total",
        "counter",
        "Attempts rejected by an open circuit breaker.",
        ("route", "upstream"),
    ),
    Family(
        "bulkhead_rejected_total",
        "counter",
        "Attempts rejected by a full bulkhead.",
        ("route", "upstream"),
    ),
    Family(
        "fallbacks_total",
        "counter",
        "Fallback responses served, by kind.",
        ("route", "kind"),
    ),
    Family(
        "rate_limited_total",
        "counter",
        "Requests refused for rate or quota, by who refused: our local or shared rate limit, "
        "our quota gate (quota), or the provider itself (upstream).",
        ("route", "source"),
    ),
    # -- events --------------------------------------------------------------------------
    Family(
        "breaker_transitions_total",
        "counter",
        "Circuit breaker state transitions.",
        ("route", "upstream", "from_state", "to_state"),
    ),
    Family(
        "failovers_total",
        "counter",
        "Attempts sent to another target of a failover route, by the reason.",
        ("route", "from_upstream", "to_upstream", "reason"),
    ),
    Family(
        "cache_evictions_total",
        "counter",
        "Fallback entries evicted to stay within max_bytes.",
    ),
    Family(
        "config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        ("result",),
    ),
    Family(
        "config_last_reload_success",
        "gauge",
        "1 when the last configuration load (start or reload) was accepted, 0 when rejected.",
    ),
    Family(
        "config_last_reload_timestamp_seconds",
        "gauge",
        "Epoch seconds of the last configuration load attempt (start or reload, any result).",
    ),
    Family(
        "pg_probe_duration_seconds",
        "histogram",
        "Postgres probe duration (acquire + query).",
        ("target",),
    ),
    Family(
        "pg_probe_failures_total",
        "counter",
        "Failed Postgres probes, by reason.",
        ("target", "reason"),
    ),
    # -- live state, read at scrape time -------------------------------------------------
    Family(
        "breaker_state",
        "gauge",
        "1 for the breaker's current state; an open breaker whose open_for has passed "
        "reports open until a trial permit is actually granted.",
        ("route", "upstream", "state"),
    ),
    Family(
        "breaker_opened_timestamp_seconds",
        "gauge",
        "Epoch seconds when the breaker last left closed (open, half_open, forced_open); "
        "0 when closed.",
        ("route", "upstream"),
    ),
    Family("bulkhead_in_flight", "gauge", "Attempts in flight.", ("route", "upstream")),
    Family("bulkhead_queued", "gauge", "Attempts waiting for a slot.", ("route", "upstream")),
    Family("cache_entries", "gauge", "Stored fallback entries."),
    Family("cache_bytes", "gauge", "Bytes of stored fallbacks."),
    Family("config_info", "gauge", "1, labelled with the live config's hash.", ("hash",)),
    Family(
        "upstream_credentials_present",
        "gauge",
        "1 when every injected header of the upstream resolved non-empty, 0 when one was "
        "omitted because its ${VAR} is empty.",
        ("upstream",),
    ),
    Family(
        "upstream_quota_remaining",
        "gauge",
        "The provider's remaining quota (the lowest over credential partitions).",
        ("upstream",),
    ),
    Family(
        "upstream_quota_reset_seconds",
        "gauge",
        "Seconds until that quota resets.",
        ("upstream",),
    ),
    Family(
        "build_info",
        "gauge",
        "1, labelled with the proxy's version, git revision and Python version.",
        ("version", "revision", "python"),
    ),
    Family("pg_up", "gauge", "1 when the last probe succeeded.", ("target",)),
    Family("pg_status", "gauge", "1 for the target's current status.", ("target", "status")),
    Family(
        "pg_pool_connections",
        "gauge",
        "The prober's own pool (not the agent's): its connections, by state.",
        ("target", "state"),
    ),
    Family(
        "pg_pool_size",
        "gauge",
        "The prober's own pool (not the agent's): its current size.",
        ("target",),
    ),
    Family(
        "pg_pool_max_size",
        "gauge",
        "The prober's own pool (not the agent's): its maximum size.",
        ("target",),
    ),
    Family(
        "pg_agent_pool_size",
        "gauge",
        "The agent's pool as seen server-side: its connections (application_name matches).",
        ("target",),
    ),
    Family(
        "pg_agent_pool_used",
        "gauge",
        "The agent's pool as seen server-side: active + idle in transaction connections.",
        ("target",),
    ),
    Family(
        "pg_agent_pool_idle",
        "gauge",
        "The agent's pool as seen server-side: idle connections.",
        ("target",),
    ),
    Family(
        "pg_server_connections",
        "gauge",
        "The agent's connections seen in pg_stat_activity, by state.",
        ("target", "state"),
    ),
    Family(
        "pg_server_utilization_ratio",
        "gauge",
        "The agent's pool utilization (0..1): agent connections / agent_pool_size, else all "
        "connections / max_connections.",
        ("target",),
    ),
    Family(
        "pg_server_utilization",
        "gauge",
        "Deprecated duplicate of pg_server_utilization_ratio, removed in the next release.",
        ("target",),
    ),
    Family("pg_consecutive_failures", "gauge", "Consecutive failed probes.", ("target",)),
)
# The fleet state backend's families: rendered only once a Redis backend has reported, so
# a proxy with `state: {backend: local}` exports no state_backend_* family at all.
STATE_FAMILIES = _families(
    Family(
        "state_backend_up",
        "gauge",
        "1 while the fleet state backend answers; 0 while it is down and shared limits are "
        "enforced locally (DESIGN §15).",
        ("backend",),
    ),
    Family(
        "state_backend_errors_total",
        "counter",
        "Failed or timed-out calls to the fleet state backend, by operation.",
        ("backend", "op"),
    ),
)


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else "OTHER"


def git_revision() -> str:
    """The git revision `resilience-proxy --version` names (proxy.version: the checkout the
    package runs from, else "unknown"), read once."""
    return version_info()[1]


class RequestRecord:
    """What one request did, filled by the stages and observed once at the end."""

    __slots__ = (
        "attempts",
        "breaker_rejected",
        "budget_exhausted",
        "bulkhead_rejected",
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
        self.breaker_rejected = 0  # attempts an open breaker refused
        self.bulkhead_rejected = 0  # attempts a full bulkhead refused
        self.target = 0  # the target of the last attempt (or refusal)
        # rate_limited_total{source}: local | shared (our buckets), quota (our quota gate),
        # upstream (the provider refused for quota); None: not rate-limited
        self.rate_limited: str | None = None


class Histogram:
    """Plain bucket counts (not cumulative; the last is +Inf) and a sum, in seconds."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1  # le: value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for le, n in zip(_LE, self.counts, strict=True):
            total += n
            out.append((le, float(total)))
        return out


class _RouteCounts:
    """Per-route counters, kept across reloads (a reload never resets a counter)."""

    __slots__ = (
        "budget_exhausted",
        "duration",
        "fallback_stale",
        "fallback_static",
        "rate_limited",
        "requests",
        "retries",
        "retry_kinds",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}  # (method, code, outcome)
        self.duration = Histogram()
        self.retries: dict[str, int] = {}
        self.retry_kinds = dict.fromkeys(RETRY_CALL_KINDS, 0)
        self.budget_exhausted = 0
        self.fallback_stale = 0
        self.fallback_static = 0
        self.rate_limited = dict.fromkeys(RATE_LIMIT_SOURCES, 0)


class _TargetCounts:
    """Per (route, upstream) counters."""

    __slots__ = ("attempts", "breaker_rejected", "bulkhead_rejected", "duration")

    def __init__(self) -> None:
        self.attempts = dict.fromkeys(ATTEMPT_RESULTS, 0)
        self.duration = Histogram()
        self.breaker_rejected = 0
        self.bulkhead_rejected = 0


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


class Metrics:
    """Owns the registry and every count; `route()` binds the counts of one route."""

    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.clock = clock  # dates reloads (wall) and breaker transitions (monotonic)
        self._routes: dict[str, _RouteCounts] = {}
        self._targets: dict[tuple[str, str], _TargetCounts] = {}
        self._transitions: dict[tuple[str, str, str, str], int] = {}
        self._failovers: dict[tuple[str, str, str, str], int] = {}
        self._reloads = dict.fromkeys(("ok", "error", "unchanged"), 0)
        self.last_reload_success: float | None = None
        self.last_reload_time = 0.0
        self.cache_evictions = 0
        self._pg_duration: dict[str, Histogram] = {}
        self._pg_failures: dict[tuple[str, str], int] = {}
        self._unrouted: dict[tuple[str, int, str], int] = {}  # route "" requests
        self._state_up: dict[str, float] = {}  # backend → 0/1; empty until Redis reports
        self._state_errors: dict[tuple[str, str], int] = {}  # (backend, op) → count
        self._state_seen = False
        self._recent: dict[str, dict[str, RecentCounter]] = {}
        self.history: dict[str, RouteHistory] = {}
        self.live = LiveState()
        git_revision()  # once, at start: never a subprocess during a scrape
        self.registry.register(_Collector(self))
        for extra in (ProcessCollector, PlatformCollector, GCCollector):
            extra(registry=self.registry)

    def recent_for(self, route: str) -> dict[str, RecentCounter]:
        """Last-minute counters per route, kept across reloads like the metrics themselves."""
        counters = self._recent.get(route)
        if counters is None:
            counters = self._recent[route] = {
                name: RecentCounter() for name in ("requests", "retries", "fallbacks", "failures")
            }
        return counters

    def history_for(self, route: str) -> RouteHistory:
        """The last 15 minutes of a route in 10 s slots, for the status page's plots."""
        history = self.history.get(route)
        if history is None:
            history = self.history[route] = RouteHistory()
        return history

    def route_counts(self, route: str) -> _RouteCounts:
        counts = self._routes.get(route)
        if counts is None:
            counts = self._routes[route] = _RouteCounts()
        return counts

    def target_counts(self, route: str, upstream: str) -> _TargetCounts:
        key = (route, upstream)
        counts = self._targets.get(key)
        if counts is None:
            counts = self._targets[key] = _TargetCounts()
        return counts

    def route(self, route: str, upstream: str, *failover: str) -> RouteMetrics:
        """Counts for a route; `failover` names its other targets, in order."""
        return RouteMetrics(self, route, upstream, failover)

    def outcomes(self, route: str) -> dict[str, int]:
        """Requests by outcome since start, for the status page."""
        out: dict[str, int] = {}
        counts = self._routes.get(route)
        if counts is not None:
            for (_, _, outcome), n in counts.requests.items():
                out[outcome] = out.get(outcome, 0) + n
        return out

    def totals(self, route: str) -> dict[str, int]:
        """Retries and fallbacks since start, for the status page."""
        counts = self._routes.get(route)
        if counts is None:
            return {"retries": 0, "fallbacks_stale": 0, "fallbacks_static": 0}
        return {
            "retries": sum(counts.retries.values()),
            "fallbacks_stale": counts.fallback_stale,
            "fallbacks_static": counts.fallback_static,
        }

    def on_event(self, event: Event) -> None:
        if isinstance(event, BreakerTransitioned):
            key = (event.route, event.upstream, event.from_state, event.to_state)
            self._transitions[key] = self._transitions.get(key, 0) + 1
            history = self.history.get(event.route)
            if history is not None:
                # As breaker_state reports it: a hold that ran out (noticed lazily, often by a
                # scrape) is still `open` until a trial is granted; trials are short, so the
                # timeline keeps it open until the breaker closes or re-opens.
                to = "open" if event.to_state == "half_open" else event.to_state
                frm = "open" if event.from_state == "half_open" else event.from_state
                history.note_breaker(self.clock.now(), frm, to)
        elif isinstance(event, FailedOver):
            key3 = (event.route, event.from_upstream, event.to_upstream, event.reason)
            self._failovers[key3] = self._failovers.get(key3, 0) + 1
        elif isinstance(event, ConfigReloaded):
            self._reloads[event.result] = self._reloads.get(event.result, 0) + 1
            self.last_reload_success = 0.0 if event.result == "error" else 1.0
            self.last_reload_time = self.clock.wall()
        elif isinstance(event, PgProbed):
            histogram = self._pg_duration.get(event.target)
            if histogram is None:
                histogram = self._pg_duration[event.target] = Histogram()
            histogram.observe(event.duration)
            if not event.ok:
                key2 = (event.target, event.reason or "other")
                self._pg_failures[key2] = self._pg_failures.get(key2, 0) + 1
        elif isinstance(event, StateBackendErrored):
            self._state_seen = True
            key4 = (event.backend, event.op)
            self._state_errors[key4] = self._state_errors.get(key4, 0) + 1
        elif isinstance(event, StateBackendChanged):
            self._state_seen = True
            self._state_up = {event.backend: 1.0 if event.up else 0.0}  # one live backend

    def state_backend_gone(self) -> None:
        """The Redis backend was swapped for the local one: no state_backend_up series."""
        self._state_up = {}

    def sync_cache_evictions(self, total: int) -> None:
        """The store counts evictions itself; mirror its total into the counter."""
        if total > self.cache_evictions:
            self.cache_evictions = total


class RouteMetrics:
    """The counts of one (route, upstream), bound once when a config is compiled."""

    __slots__ = (
        "history",
        "recent",
        "recent_requests",
        "route",
        "route_counts",
        "target",
        "targets",
        "upstream",
    )

    def __init__(
        self, m: Metrics, route: str, upstream: str, failover: tuple[str, ...] = ()
    ) -> None:
        self.route = route
        self.upstream = upstream
        self.route_counts = m.route_counts(route)
        self.target = m.target_counts(route, upstream)
        # per target (index 0: the primary, then failover's targets in order)
        self.targets = (self.target, *(m.target_counts(route, name) for name in failover))
        # requests, retries, fallbacks and failures in the last minute, by name
        self.recent = m.recent_for(route)
        self.recent_requests = self.recent["requests"]
        self.history = m.history_for(route)

    def observe(self, rec: RequestRecord, duration: float, retry_enabled: bool, now: float) -> None:
        """One finished request. The common case (one attempt, no retry, no refusal) is
        counted inline: this runs once per request."""
        counts = self.route_counts
        outcome = rec.outcome
        code = rec.code
        # arbitrary client methods must not grow the label set: OTHER
        method = rec.method if rec.method in STANDARD_METHODS else "OTHER"
        key = (method, code, outcome)
        requests = counts.requests
        requests[key] = requests.get(key, 0) + 1
        bucket = bisect_left(DURATION_BUCKETS, duration)  # le: value <= bound
        histogram = counts.duration
        histogram.counts[bucket] += 1
        histogram.sum += duration
        attempts = rec.attempts
        if attempts:
            targets = self.targets
            for result, seconds, index in attempts:
                target = targets[index]
                target.attempts[result] += 1
                histogram = target.duration
                histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
                histogram.sum += seconds
            if retry_enabled:
                ok = outcome in _GOOD_OUTCOMES and code < 500
                if len(attempts) > 1:
                    kind = "successful_with_retry" if ok else "failed_with_retry"
                else:
                    kind = "successful_without_retry" if ok else "failed_without_retry"
                counts.retry_kinds[kind] += 1
        self.recent_requests.add(now)
        if (
            outcome != "ok"
            or code == 429
            or rec.retries
            or rec.budget_exhausted
            or rec.rate_limited is not None
            or rec.breaker_rejected
            or rec.bulkhead_rejected
        ):
            self._uncommon(rec, outcome, now)
        self.history.add_in(now, outcome, bucket)

    def _uncommon(self, rec: RequestRecord, outcome: str, now: float) -> None:
        counts = self.route_counts
        recent = self.recent
        if rec.retries:
            recent["retries"].add(now, len(rec.retries))
            retries = counts.retries
            for reason in rec.retries:
                retries[reason] = retries.get(reason, 0) + 1
        if outcome not in _NOT_FAILURES:
            recent["fallbacks" if outcome.startswith("fallback") else "failures"].add(now)
            if outcome == "fallback-stale":
                counts.fallback_stale += 1
            elif outcome == "fallback-static":
                counts.fallback_static += 1
        if rec.budget_exhausted:
            counts.budget_exhausted += 1
        source = rec.rate_limited
        if source is None and rec.code == 429 and outcome == "upstream-status":
            source = "upstream"  # relayed from the provider
        if source is not None:
            counts.rate_limited[source] += 1
        if rec.breaker_rejected:
            self.targets[rec.target].breaker_rejected += rec.breaker_rejected
        if rec.bulkhead_rejected:
            self.targets[rec.target].bulkhead_rejected += rec.bulkhead_rejected


def observe_unrouted(m: Metrics, method: str, code: int, outcome: str, duration: float) -> None:
    """Requests refused before a route was chosen (no route, bad request): route label ''."""
    key = (method_label(method), code, outcome)
    m._unrouted[key] = m._unrouted.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class BreakerView:
    """One breaker as the exporter sees it (see `Breaker.exported`)."""

    route: str
    upstream: str
    state: str
    opened_at: float  # epoch seconds; 0 when closed


def _no_items() -> tuple[Any, ...]:
    return ()


@dataclass
class LiveState:
    """Callables that report live state at scrape time; set by the app as it (re)builds."""

    breakers: Callable[[], Iterable[BreakerView]] = _no_items
    bulkheads: Callable[[], Iterable[tuple[str, str, int, int]]] = _no_items
    cache: Callable[[], tuple[int, int]] = field(default=lambda: (0, 0))
    config_hash: Callable[[], str] = field(default=lambda: "")
    postgres: Callable[[], Iterable[dict[str, Any]]] = _no_items
    # (upstream, every injected header resolved non-empty)
    credentials: Callable[[], Iterable[tuple[str, bool]]] = _no_items
    # (upstream, quota summary with "remaining" and "reset_seconds", None when unknown)
    quotas: Callable[[], Iterable[tuple[str, dict[str, Any]]]] = _no_items


class _Collector(Collector):
    """Renders `Metrics` at scrape time, in `FAMILIES` order."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        families = {name: f.new() for name, f in FAMILIES.items()}
        self._render_requests(families)
        self._render_events(families)
        self._render_live(families)
        self._render_postgres(families)
        yield from families.values()
        if self.m._state_seen:
            state = {name: f.new() for name, f in STATE_FAMILIES.items()}
            self._render_state(state)
            yield from state.values()

    def _render_state(self, f: dict[str, Any]) -> None:
        for backend, up in self.m._state_up.items():
            f["state_backend_up"].add_metric([backend], up)
        for labels, n in self.m._state_errors.items():
            f["state_backend_errors_total"].add_metric(list(labels), n)

    def _render_requests(self, f: dict[str, Any]) -> None:
        m = self.m
        requests = f["requests_total"]
        for (method, code, outcome), n in m._unrouted.items():
            requests.add_metric(["", method, str(code), outcome], n)
        for route, counts in m._routes.items():
            for (method, code, outcome), n in counts.requests.items():
                requests.add_metric([route, method, str(code), outcome], n)
            f["request_duration_seconds"].add_metric(
                [route], counts.duration.buckets(), counts.duration.sum
            )
            for reason, n in counts.retries.items():
                f["retries_total"].add_metric([route, reason], n)
            for kind, n in counts.retry_kinds.items():
                f["retry_calls_total"].add_metric([route, kind], n)
            f["retry_budget_exhausted_total"].add_metric([route], counts.budget_exhausted)
            f["fallbacks_total"].add_metric([route, "stale"], counts.fallback_stale)
            f["fallbacks_total"].add_metric([route, "static"], counts.fallback_static)
            for source, n in counts.rate_limited.items():
                f["rate_limited_total"].add_metric([route, source], n)
        for (route, upstream), target in m._targets.items():
            for result, n in target.attempts.items():
                f["upstream_attempts_total"].add_metric([route, upstream, result], n)
            f["upstream_attempt_duration_seconds"].add_metric(
                [route, upstream], target.duration.buckets(), target.duration.sum
            )
            f["breaker_rejected_total"].add_metric([route, upstream], target.breaker_rejected)
            f["bulkhead_rejected_total"].add_metric([route, upstream], target.bulkhead_rejected)

    def _render_events(self, f: dict[str, Any]) -> None:
        m = self.m
        for labels, n in m._transitions.items():
            f["breaker_transitions_total"].add_metric(list(labels), n)
        for labels, n in m._failovers.items():
            f["failovers_total"].add_metric(list(labels), n)
        f["cache_evictions_total"].add_metric([], m.cache_evictions)
        for result, n in m._reloads.items():
            f["config_reloads_total"].add_metric([result], n)
        if m.last_reload_success is not None:
            f["config_last_reload_success"].add_metric([], m.last_reload_success)
            f["config_last_reload_timestamp_seconds"].add_metric([], m.last_reload_time)
        for target, histogram in m._pg_duration.items():
            f["pg_probe_duration_seconds"].add_metric([target], histogram.buckets(), histogram.sum)
        for labels2, n in m._pg_failures.items():
            f["pg_probe_failures_total"].add_metric(list(labels2), n)

    def _render_live(self, f: dict[str, Any]) -> None:
        live = self.m.live
        state, opened = f["breaker_state"], f["breaker_opened_timestamp_seconds"]
        for view in live.breakers():
            for s in BREAKER_STATES:
                state.add_metric([view.route, view.upstream, s], 1.0 if s == view.state else 0.0)
            opened.add_metric([view.route, view.upstream], view.opened_at)
        for route, upstream, n_flight, n_queued in live.bulkheads():
            f["bulkhead_in_flight"].add_metric([route, upstream], n_flight)
            f["bulkhead_queued"].add_metric([route, upstream], n_queued)
        entries, size = live.cache()
        f["cache_entries"].add_metric([], entries)
        f["cache_bytes"].add_metric([], size)
        config_hash = live.config_hash()
        if config_hash:
            f["config_info"].add_metric([config_hash], 1.0)
        for upstream, present in live.credentials():
            f["upstream_credentials_present"].add_metric([upstream], 1.0 if present else 0.0)
        for upstream, summary in live.quotas():
            if summary.get("remaining") is not None:
                f["upstream_quota_remaining"].add_metric([upstream], float(summary["remaining"]))
            if summary.get("reset_seconds") is not None:
                reset = float(summary["reset_seconds"])
                f["upstream_quota_reset_seconds"].add_metric([upstream], reset)
        f["build_info"].add_metric([__version__, git_revision(), platform.python_version()], 1.0)

    def _render_postgres(self, f: dict[str, Any]) -> None:
        for snap in self.m.live.postgres():
            name = str(snap.get("name", ""))
            current = snap.get("status", "unknown")
            f["pg_up"].add_metric([name], 1.0 if snap.get("up") else 0.0)
            for s in PG_STATUSES:
                f["pg_status"].add_metric([name, s], 1.0 if s == current else 0.0)
            own = snap.get("prober_pool") or {}
            f["pg_pool_connections"].add_metric([name, "used"], float(own.get("used", 0) or 0))
            f["pg_pool_connections"].add_metric([name, "idle"], float(own.get("idle", 0) or 0))
            f["pg_pool_size"].add_metric([name], float(own.get("size", 0) or 0))
            f["pg_pool_max_size"].add_metric([name], float(own.get("max_size", 0) or 0))
            srv = snap.get("server") or {}
            for s in ("active", "idle", "idle_in_transaction", "waiting"):
                value = srv.get(s)
                if value is not None:  # unknown before the first good probe: no sample
                    f["pg_server_connections"].add_metric([name, s], float(value))
            if srv.get("total") is not None:  # the agent's pool, once it has been seen
                f["pg_agent_pool_size"].add_metric([name], float(snap.get("pool_size") or 0))
                f["pg_agent_pool_used"].add_metric([name], float(snap.get("pool_used") or 0))
                f["pg_agent_pool_idle"].add_metric([name], float(snap.get("pool_idle") or 0))
            utilization = snap.get("utilization")
            if utilization is not None:
                f["pg_server_utilization_ratio"].add_metric([name], float(utilization))
                f["pg_server_utilization"].add_metric([name], float(utilization))
            failures = float(snap.get("consecutive_failures", 0) or 0)
            f["pg_consecutive_failures"].add_metric([name], failures)

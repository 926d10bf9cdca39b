"""The runtime configuration: frozen, typed, already validated and compiled.

YAML → `proxy.config.schema` (pydantic `*Spec` models, the YAML's shape) →
`proxy.config.compile` → these objects. Durations are float seconds, sizes int bytes,
ratios floats in [0, 1], header names lower-case, methods upper-case. Nothing here is
parsed again per request. A `None` policy means the stage is off for that route.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from proxy.config.loader import Problem

Jitter = Literal["full", "equal", "none"]
BreakerMode = Literal["enforce", "observe", "disabled"]
Readiness = Literal["ignore", "fail_on_critical"]
StateBackendKind = Literal["local", "redis"]

# Outcome conditions that are not HTTP statuses, spelled as in the YAML and metric labels.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"
BREAKER_OPEN = "breaker-open"
BULKHEAD_FULL = "bulkhead-full"
QUOTA = "quota"
RATE_LIMITED = "rate-limited"
QuotaHeaders = Literal["github", "cloudinary", "huggingface", "ietf", "generic"]


@dataclass(frozen=True, slots=True)
class StatusSet:
    """A set of HTTP statuses built from tokens like `5xx`, `429`, `500-504`, `gateway-error`.

    `tokens` keeps the YAML spelling, in order, so a status can be labelled by the token
    that matched it (`retries_total{reason="5xx"}`).
    """

    tokens: tuple[str, ...] = ()
    statuses: frozenset[int] = frozenset()

    def __contains__(self, status: object) -> bool:
        return status in self.statuses

    def label_for(self, status: int) -> str:
        for token in self.tokens:
            if status in status_token_members(token):
                return token
        return str(status)


def status_token_members(token: str) -> frozenset[int]:
    """The statuses one `on`/`failure_statuses` token stands for (unknown tokens: none)."""
    if token == "gateway-error":
        return frozenset((502, 503, 504))
    if len(token) == 3 and token[0] in "12345" and token[1:] == "xx":
        base = int(token[0]) * 100
        return frozenset(range(base, base + 100))
    if "-" in token:
        low, _, high = token.partition("-")
        if low.isdigit() and high.isdigit():
            return frozenset(range(int(low), int(high) + 1))
        return frozenset()
    if token.isdigit():
        return frozenset((int(token),))
    return frozenset()


@dataclass(frozen=True, slots=True)
class TlsSettings:
    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """`upstreams.<name>.quota` (DESIGN §14): which provider headers to read, and how many
    requests to keep in reserve before the reset."""

    headers: QuotaHeaders = "generic"
    reserve: int = 0
    max_queued: int = 128  # requests waiting for the reset at once; beyond that, 429


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str  # scheme://host[:port][/base], no trailing slash, no userinfo
    scheme: str  # "http" | "https"
    host: str  # for the Host header: host[:port] as the URL spelled it
    base_path: str  # "" or "/base" without trailing slash
    headers: tuple[tuple[str, str], ...] = ()  # injected; omitted when a ${VAR} was empty
    forwarded_headers: bool = False
    request_id: bool = False  # send a generated X-Request-Id upstream
    connect_timeout: float = 2.0
    max_connections: int = 100
    idle_timeout: float = 4.0  # seconds a pooled connection may stay idle before it is closed
    tls: TlsSettings = TlsSettings()
    userinfo: tuple[str, str] | None = None  # from the URL; sent as Basic auth, never logged
    quota: QuotaPolicy | None = None
    # Injected headers omitted because a ${VAR} in them expanded to empty (names as written)
    missing_headers: tuple[str, ...] = ()

    @property
    def injects_credentials(self) -> bool:
        """True when the proxy adds credentials (headers or URL userinfo) of its own."""
        return bool(self.headers) or self.userinfo is not None


@dataclass(frozen=True, slots=True)
class TimeoutPolicy:
    total: float | None = 30.0
    per_try: float | None = 10.0
    idle: float | None = 60.0


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial: float = 0.5
    max: float = 10.0
    multiplier: float = 2.0
    jitter: Jitter = "full"


@dataclass(frozen=True, slots=True)
class RetryAfterPolicy:
    honor: bool = True
    max: float = 60.0


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    ratio: float = 0.2
    min_per_second: float = 1.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryOn:
    """Which outcomes a retry may follow: transport conditions plus statuses."""

    connect_failure: bool = True
    reset: bool = True
    timeout: bool = True
    statuses: StatusSet = StatusSet(("502", "503", "504"), frozenset((502, 503, 504)))
    tokens: tuple[str, ...] = ("connect-failure", "reset", "timeout", "502", "503", "504")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff: BackoffPolicy = BackoffPolicy()
    on: RetryOn = RetryOn()
    methods: frozenset[str] = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
    idempotency_header: str | None = "idempotency-key"  # lower-case
    retry_after: RetryAfterPolicy = RetryAfterPolicy()
    budget: BudgetPolicy = BudgetPolicy()
    max_body: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class FailureRatePolicy:
    threshold: float = 0.5
    window: float | None = 60.0  # seconds, per-second buckets; exclusive with window_calls
    window_calls: int | None = None
    min_calls: int = 20


@dataclass(frozen=True, slots=True)
class SlowCallPolicy:
    duration: float
    threshold: float


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive_failures: int | None = 5  # None: this trigger is off
    failure_rate: FailureRatePolicy | None = FailureRatePolicy()
    slow_calls: SlowCallPolicy | None = None
    failure_statuses: StatusSet = StatusSet(
        ("5xx", "429"), frozenset(range(500, 600)) | frozenset((429,))
    )
    open_for: float = 60.0
    open_for_max: float = 600.0
    half_open_calls: int = 3
    half_open_max_wait: float = 30.0
    mode: BreakerMode = "enforce"
    share: bool = False  # publish trips to, and take trips from, the fleet (DESIGN §15)


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    max_concurrent: int = 64
    max_queued: int = 128
    queue_timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class StaticFallback:
    status: int = 503
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    stale_if_error: float = 3600.0
    methods: frozenset[str] = frozenset(("GET", "HEAD"))
    # Transport/proxy conditions (connect-failure, reset, timeout, breaker-open,
    # bulkhead-full) and statuses (the final upstream response) that trigger a fallback.
    conditions: frozenset[str] = frozenset(
        ("breaker-open", "timeout", "connect-failure", "reset", "bulkhead-full")
    )
    statuses: StatusSet = StatusSet(("5xx",), frozenset(range(500, 600)))
    identity_headers: tuple[str, ...] = ()  # lower-case
    store_set_cookie: bool = False
    override_revalidate: bool = False
    static: StaticFallback | None = None


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """`routes[].rate_limit` (DESIGN §14): a token bucket of `burst` gaining `rps` per second,
    for the whole route (`per_header` None) or per value of that request header."""

    rps: float
    burst: float
    per_header: str | None = None  # lower-case header name; None: one bucket per route
    shared: bool = False  # through the fleet state backend (DESIGN §15)
    max_callers: int = 10_000


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Ordered alternatives to a route's upstream (DESIGN §16).

    `upstreams` are the targets after the primary, in order. `conditions` are the
    non-status outcomes (connect-failure, reset, timeout, breaker-open, quota) after which
    the next attempt goes to the next target at once; `statuses` the upstream answers.
    """

    upstreams: tuple[Upstream, ...]
    conditions: frozenset[str] = frozenset(
        ("connect-failure", "reset", "timeout", "breaker-open", "quota")
    )
    statuses: StatusSet = StatusSet(("5xx",), frozenset(range(500, 600)))

    @property
    def tokens(self) -> tuple[str, ...]:
        """The `on` list as written (conditions first), for the effective config."""
        order = ("connect-failure", "reset", "timeout", "breaker-open", "quota")
        return tuple(c for c in order if c in self.conditions) + self.statuses.tokens


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path_prefix: str = "/"
    host: str | None = None  # lower-case; includes ":port" only when the YAML gave one
    methods: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    upstream: Upstream
    strip_prefix: bool = True
    timeout: TimeoutPolicy = TimeoutPolicy()
    retry: RetryPolicy | None = None
    breaker: BreakerPolicy | None = None
    bulkhead: BulkheadPolicy | None = None
    fallback: FallbackPolicy | None = None
    rate_limit: RateLimitPolicy | None = None
    failover: FailoverPolicy | None = None

    @property
    def targets(self) -> tuple[Upstream, ...]:
        """The upstreams an attempt may go to, in order: the primary, then failover's."""
        if self.failover is None:
            return (self.upstream,)
        return (self.upstream, *self.failover.upstreams)


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_body: int = 10 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    client_header_timeout: float = 10.0
    client_body_timeout: float = 30.0
    client_idle_timeout: float = 75.0


@dataclass(frozen=True, slots=True)
class ShutdownPolicy:
    quiet_period: float = 5.0
    drain_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    enabled: bool = False
    sample: float = 1.0  # share of requests logged; errors always are
    slow: float = 0.0  # seconds: log only requests at least this slow


@dataclass(frozen=True, slots=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9901
    token: str | None = None  # None: mutations refused with a how-to message


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_bytes: int = 64 * 1024 * 1024
    max_entry_bytes: int = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StateSettings:
    """`state` (DESIGN §15): where shared rate limits, quota snapshots and shared breaker
    trips live."""

    backend: StateBackendKind = "local"
    url: str | None = None  # redis://...; may hold a password: never log it
    key_prefix: str = "resilience-proxy"
    timeout: float = 0.05  # seconds: bounds every Redis call, its connect included


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    name: str
    dsn: str  # may hold a password: never log it; use `display_dsn`
    display_dsn: str  # the DSN with its password redacted
    application_name: str = "cofounder_agent"
    agent_pool_size: int | None = None
    pool_min_size: int = 1
    pool_max_size: int = 2
    probe_interval: float = 60.0
    probe_timeout: float = 5.0
    probe_query: str = "SELECT 1"
    degraded_latency: float = 0.5
    degraded_utilization: float = 0.8
    degraded_consecutive_failures: int = 1
    critical_utilization: float = 0.95
    critical_consecutive_failures: int = 3
    readiness: Readiness = "ignore"


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    allow_remote_clients: bool = False
    admin: AdminSettings = AdminSettings()
    limits: Limits = Limits()
    shutdown: ShutdownPolicy = ShutdownPolicy()
    headers_with_underscores: str = "reject"  # reject | drop | allow
    access_log: AccessLogSettings = AccessLogSettings()
    state_file: str | None = None  # resolved path; None: persistence off
    state: StateSettings = StateSettings()
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    cache: CacheSettings = CacheSettings()
    postgres: tuple[PostgresTarget, ...] = ()
    source: str = "<memory>"  # the file it came from
    hash: str = ""  # sha256 hex of the file's bytes (first 12 shown in config_info)
    # The effective config as a plain tree with every secret replaced by "<redacted>",
    # for GET /config.
    redacted: Mapping[str, object] = field(default_factory=dict)
    # Every secret value (injected header values, ${VAR} values, passwords, the token),
    # so that logs and error bodies can be scrubbed defensively.
    secrets: frozenset[str] = frozenset()
    # Files the config reads (`${file:PATH}`, admin.token_file): a change to one reloads.
    watched_files: tuple[str, ...] = ()
    # Things that do not make the config invalid but are probably not what was meant
    # (a route shadowed by an earlier one): printed by `check`, logged at start and reload.
    warnings: tuple[Problem, ...] = ()

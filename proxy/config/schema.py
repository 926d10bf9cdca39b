"""The YAML's shape: pydantic `*Spec` models, frozen, unknown keys forbidden.

Each field is optional unless a config cannot work without it: an absent key stays `None`
here and takes the built-in default (the dataclass defaults in `proxy.config.model`) at
compile time. That keeps "absent" distinguishable from "set", which the key-by-key merge
of a route over its named policy needs. Values are already normalised where a field has one
spelling (durations in seconds, sizes in bytes, ratios in [0, 1], methods upper-case,
header names lower-case); cross-field rules that need defaults or merging live in
`proxy.config.compile`.

Stage blocks (`retry`, `breaker`, ...) and some sub-blocks also take `false` (off, even when
the route's policy turns it on) or `true` (on, with the policy's or built-in settings).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
)

from proxy.config.loader import Document, Path, Problem, format_path
from proxy.config.units import (
    DURATION_HINT,
    DURATION_PATTERN,
    RATIO_PATTERN,
    SIZE_PATTERN,
    format_duration,
    parse_duration,
    parse_ratio,
    parse_size,
    quote,
)
from proxy.headers import HOP_BY_HOP

NAME_PATTERN = r"^[a-z0-9_.-]+$"
# In the JSON Schema every typed scalar also accepts a string holding a `${...}` reference.
ENV_REFERENCE_PATTERN = r"\$\{([A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?|file:[^}]+)\}"
_BOOL_WORDS = frozenset(("true", "false", "yes", "no", "on", "off"))
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (methods, header names)
_NAME = re.compile(NAME_PATTERN)
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")

# Headers the proxy owns or that describe one hop: never injected from the config.
UNINJECTABLE_HEADERS = (HOP_BY_HOP - {"proxy-authorization", "proxy-authenticate"}) | {
    "host",
    "content-length",
    "via",
}

CONDITIONS_RETRY = ("connect-failure", "reset", "timeout")
CONDITIONS_FALLBACK = (
    "breaker-open",
    "timeout",
    "connect-failure",
    "reset",
    "bulkhead-full",
    "quota",
)
# retry.on's vocabulary plus the two refusals that send nothing (DESIGN §16).
CONDITIONS_FAILOVER = ("connect-failure", "reset", "timeout", "breaker-open", "quota")
_STATUS_HELP = "5xx (or 4xx, ...), gateway-error, a status like 503, a range like 500-504"


# --- scalar validators -------------------------------------------------------------------


def _duration(
    minimum: float, *, exclusive: bool = False, allow_off: bool = False
) -> Callable[[object], float]:
    """A validator: parse a duration and enforce its floor; `off`/`false` → inf (no limit)."""

    def validate(value: object) -> float:
        if allow_off and (
            value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false"))
        ):
            return math.inf
        seconds = parse_duration(value)
        if exclusive and seconds <= minimum:
            raise ValueError(f"must be > {format_duration(minimum)}, got {quote(value)}")
        if seconds < minimum:
            raise ValueError(f"must be >= {format_duration(minimum)}, got {quote(value)}")
        return seconds

    return validate


def _size(minimum: int) -> Callable[[object], int]:
    def validate(value: object) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"must be >= {minimum} bytes, got {quote(value)}")
        return size

    return validate


def _threshold(value: object) -> float:
    ratio = parse_ratio(value)
    if ratio <= 0:
        raise ValueError(f"must be above 0 (0 would always trip), got {quote(value)}")
    return ratio


def _schema_unit(pattern: str, *, off: bool = False, minimum: float = 0) -> WithJsonSchema:
    string_pattern = f"^(off|false)$|{pattern}" if off else pattern
    schema: dict[str, Any] = {
        "type": ["number", "string"],
        "minimum": minimum,
        "pattern": string_pattern,
    }
    return WithJsonSchema({"anyOf": [schema, {"const": False}]} if off else schema)


Duration = Annotated[float, BeforeValidator(_duration(0.0)), _schema_unit(DURATION_PATTERN)]
PositiveDuration = Annotated[
    float, BeforeValidator(_duration(0.0, exclusive=True)), _schema_unit(DURATION_PATTERN)
]
AtLeastOneSecond = Annotated[float, BeforeValidator(_duration(1.0)), _schema_unit(DURATION_PATTERN)]
AtLeastOneMillisecond = Annotated[
    float, BeforeValidator(_duration(0.001)), _schema_unit(DURATION_PATTERN)
]
# A timeout: positive, or `off` / `false` for none (compiled to None).
TimeoutValue = Annotated[
    float,
    BeforeValidator(_duration(0.0, exclusive=True, allow_off=True)),
    _schema_unit(DURATION_PATTERN, off=True),
]
Size = Annotated[int, BeforeValidator(_size(0)), _schema_unit(SIZE_PATTERN)]
PositiveSize = Annotated[int, BeforeValidator(_size(1)), _schema_unit(SIZE_PATTERN, minimum=1)]
Ratio = Annotated[float, BeforeValidator(parse_ratio), _schema_unit(RATIO_PATTERN)]
Threshold = Annotated[float, BeforeValidator(_threshold), _schema_unit(RATIO_PATTERN)]


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"must match [a-z0-9_.-]+ (lower-case), got {quote(value)}")
    return value


def _check_method(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not an HTTP method: {quote(value)}")
    return value.upper()


def _check_header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not a valid header name: {quote(value)}")
    return value.lower()


def _check_header_value(value: str) -> str:
    # The value is never quoted: injected header values are usually credentials. Other
    # non-ASCII characters are fine: they are sent as their UTF-8 bytes.
    if any((ord(char) < 0x20 and char != "\t") or 0x7F <= ord(char) <= 0x9F for char in value):
        raise ValueError("a header value must not contain control characters")
    return value.strip()


def _check_optional_header_name(value: object) -> object:
    """`false` or "" switch the idempotency header off; anything else must be a header name."""
    if value is False or value == "":
        return ""
    return value


def status_token(token: str) -> str | None:
    """The normalised status token (`5XX` → `5xx`), or None when `token` is not one."""
    token = token.strip().lower()
    if token == "gateway-error" or re.fullmatch(r"[1-5]xx", token):
        return token
    match = re.fullmatch(r"([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?", token)
    if match and (match.group(2) is None or int(match.group(1)) <= int(match.group(2))):
        return token
    return None


def _condition_validator(conditions: tuple[str, ...]) -> Callable[[str], str]:
    def validate(value: str) -> str:
        lowered = value.strip().lower()
        if lowered in conditions:
            return lowered
        token = status_token(value)
        if token is None:
            valid = ", ".join(conditions)
            where = f"{valid}, {_STATUS_HELP}" if conditions else _STATUS_HELP
            raise ValueError(f"unknown condition {quote(value)}; valid: {where}")
        return token

    return validate


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080` → ("127.0.0.1", 8080); `[::1]:8080` → ("::1", 8080). ValueError else."""
    example = "e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080"
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\[\]\s]+):([0-9]+)", text.strip())
    if not match:
        raise ValueError(f"not host:port: {quote(text)} ({example})")
    host = match.group(1) or match.group(3) or ""
    port = int(match.group(2) or match.group(4))
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {quote(host)}") from None
    elif not _HOSTNAME.fullmatch(host.lower()):
        raise ValueError(f"not a host name or address: {quote(host)} ({example})")
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host, port


def _check_listen(value: str) -> str:
    split_host_port(value)
    return value.strip()


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_userinfo(url: str) -> str:
    """A URL safe to quote in a message: any `user:password@` becomes `<redacted>@`."""
    return re.sub(r"(//)[^/@]*@", r"\1<redacted>@", url)


def _check_upstream_url(value: str) -> str:
    shown = quote(mask_userinfo(value))
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018  -- raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"not a valid URL: {shown}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {shown}")
    if not parts.hostname:
        raise ValueError(f"has no host: {shown}")
    if "?" in value or "#" in value:
        raise ValueError(f"must not have a query or fragment: {shown}")
    return value.strip()


def _check_path_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {quote(value)}")
    if any(char in value for char in "?# \t\\") or "\0" in value:
        raise ValueError(
            f"must be a plain path (no query, fragment, space or backslash), got {quote(value)}"
        )
    return value


def _check_host_match(value: str) -> str:
    host = value.strip().lower()
    port = ""
    if host.startswith("["):
        match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::([0-9]*))?", host)
        try:
            ipaddress.IPv6Address(match.group(1) if match else "")
        except ValueError:
            raise ValueError(f"not a host name or address: {quote(value)}") from None
        port = match.group(2) or "" if match else ""
    else:
        name, _, port = host.partition(":")
        if not _HOSTNAME.fullmatch(name):
            raise ValueError(f"not a host name or address: {quote(value)}")
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port must be between 1 and 65535, got {quote(port)}")
    return host


def _check_dsn(value: str) -> str:
    # Never quoted back: a DSN usually carries a password.
    scheme = value.strip().partition("://")[0].lower()
    if scheme not in ("postgres", "postgresql") or "://" not in value:
        raise ValueError("must be a postgresql://user:password@host:port/database URL")
    return value.strip()


def _check_version(value: int) -> int:
    if value != 1:
        raise ValueError(f"unsupported version {value}: this proxy reads version 1")
    return value


def _check_not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _text_schema(pattern: str | None = None, *, numbers: bool = False) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": ["string", "integer"] if numbers else "string"}
    if pattern:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


Name = Annotated[str, AfterValidator(_check_name), _text_schema(NAME_PATTERN)]
_TOKEN_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
Method = Annotated[str, AfterValidator(_check_method), _text_schema(_TOKEN_PATTERN)]
HeaderName = Annotated[str, AfterValidator(_check_header_name), _text_schema(_TOKEN_PATTERN)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value), _text_schema(numbers=True)]
OptionalHeaderName = Annotated[
    str,
    BeforeValidator(_check_optional_header_name),
    AfterValidator(lambda v: _check_header_name(v) if v else v),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"const": False}]}),
]
RetryCondition = Annotated[
    str, AfterValidator(_condition_validator(CONDITIONS_RETRY)), _text_schema(numbers=True)
]
FailoverCondition = Annotated[
    str, AfterValidator(_condition_validator(CONDITIONS_FAILOVER)), _text_schema(numbers=True)
]
FallbackCondition = Annotated[
    str, AfterValidator(_condition_validator(CONDITIONS_FALLBACK)), _text_schema(numbers=True)
]
StatusToken = Annotated[str, AfterValidator(_condition_validator(())), _text_schema(numbers=True)]
ListenAddress = Annotated[str, AfterValidator(_check_listen), _text_schema()]
UpstreamUrl = Annotated[
    str, AfterValidator(_check_upstream_url), _text_schema(r"^[hH][tT][tT][pP][sS]?://")
]
PathPrefix = Annotated[str, AfterValidator(_check_path_prefix), _text_schema("^/")]
HostMatch = Annotated[str, AfterValidator(_check_host_match), _text_schema()]
Dsn = Annotated[str, AfterValidator(_check_dsn), _text_schema("^postgres(ql)?://")]
Version = Annotated[int, AfterValidator(_check_version), WithJsonSchema({"const": 1})]
Text = Annotated[str, AfterValidator(_check_not_blank)]


def _check_redis_url(value: str) -> str:
    # Never quoted back: a Redis URL may carry a password. Empty is allowed here (a
    # `${REDIS_URL:-}` with `backend: local`); `backend: redis` needs one (compile time).
    scheme = value.strip().partition("://")[0].lower()
    if value.strip() and (scheme not in ("redis", "rediss", "unix") or "://" not in value):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")  # may hold a password
    return value.strip()


RedisUrl = Annotated[str, AfterValidator(_check_redis_url), _text_schema()]


# --- `false` / `true` / a block ------------------------------------------------------------

# Tags that pydantic inserts into error locations for these unions; not part of the key path.
UNION_TAGS = frozenset(("spec", "flag", "value"))


def _toggle_tag(value: Any) -> str:
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _BOOL_WORDS):
        return "flag"
    return "spec"


def _value_or_flag_tag(value: Any) -> str:
    return "flag" if _toggle_tag(value) == "flag" else "value"


SpecT = TypeVar("SpecT")
# A block, or `false` (off) / `true` (on with inherited or built-in settings).
Toggle = Annotated[
    Union[Annotated[SpecT, Tag("spec")], Annotated[bool, Tag("flag")]],  # noqa: UP007
    Discriminator(_toggle_tag),
]
# A positive count, or `false` (this trigger off) / `true` (on, built-in default).
CountOrFlag = Annotated[
    Union[Annotated[int, Field(ge=1), Tag("value")], Annotated[bool, Tag("flag")]],  # noqa: UP007
    Discriminator(_value_or_flag_tag),
]
# A path, or `false` (persistence off) / `true` (the default path).
PathOrFlag = Annotated[
    Union[Annotated[str, Tag("value")], Annotated[bool, Tag("flag")]],  # noqa: UP007
    Discriminator(_value_or_flag_tag),
]


# --- the models ----------------------------------------------------------------------------


class Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        coerce_numbers_to_str=True,  # `on: [503]`, header values like `X-Version: 2`
        use_attribute_docstrings=True,  # the docstrings below become schema descriptions
    )


class TimeoutSpec(Spec):
    total: TimeoutValue | None = None
    """Until the final attempt's response headers, backoff included (default 30s; off: none)."""
    per_try: TimeoutValue | None = None
    """One attempt, until its response headers; capped by the time left (default 10s)."""
    idle: TimeoutValue | None = None
    """Longest gap between response body chunks while streaming (default 60s)."""


class BackoffSpec(Spec):
    initial: AtLeastOneMillisecond | None = None
    """Wait before the first retry (default 0.5s, at least 1ms)."""
    max: PositiveDuration | None = None
    """Cap on any one wait (default 10s)."""
    multiplier: float | None = Field(None, ge=1)
    """Retry k waits min(max, initial * multiplier^(k-1)) (default 2)."""
    jitter: Literal["full", "equal", "none"] | None = None
    """full: uniform in [0, wait]; equal: [wait/2, wait]; none (default full)."""


class RetryAfterSpec(Spec):
    honor: bool | None = None
    """Wait as long as Retry-After / X-RateLimit-Reset ask, when longer (default true)."""
    max: Duration | None = None
    """A longer server-directed wait means no retry (default 60s)."""


class BudgetSpec(Spec):
    ratio: Ratio | None = None
    """Retries allowed per request that reached the retry stage in the window (default 0.2)."""
    min_per_second: float | None = Field(None, ge=0)
    """Retries always allowed per second of window, on top of the ratio (default 1)."""
    window: AtLeastOneSecond | None = None
    """The sliding window (default 10s)."""


class RetrySpec(Spec):
    max_attempts: int | None = Field(None, ge=1)
    """Total attempts, the first included (default 3)."""
    backoff: BackoffSpec | None = None
    on: list[RetryCondition] | None = None
    """connect-failure, reset, timeout, 5xx, 429, gateway-error, codes, ranges like 500-504."""
    methods: list[Method] | None = None
    """Methods that may be retried (default GET, HEAD, OPTIONS, PUT, DELETE)."""
    idempotency_header: OptionalHeaderName | None = None
    """Other methods are retried when the request has it (default Idempotency-Key; false: off)."""
    retry_after: RetryAfterSpec | None = None
    budget: BudgetSpec | None = None
    max_body: Size | None = None
    """Request bodies up to this are buffered for replay; larger ones are never retried (64KiB)."""


class FailureRateSpec(Spec):
    threshold: Threshold | None = None
    """Failure rate that opens the breaker (default 50%)."""
    window: AtLeastOneSecond | None = None
    """A time window with per-second buckets (default 60s); or window_calls, not both."""
    window_calls: int | None = Field(None, ge=1)
    """A window of the last N calls, instead of a time window."""
    min_calls: int | None = Field(None, ge=1)
    """Calls the window must hold before the rate counts (default 20)."""
    # `window` with `window_calls` is refused by compile.check_raw, on the raw tree, so that
    # it is reported together with an invalid value in the same block.


class SlowCallsSpec(Spec):
    duration: PositiveDuration
    """A call slower than this is slow."""
    threshold: Threshold
    """Slow-call rate that opens the breaker."""


class BreakerSpec(Spec):
    consecutive_failures: CountOrFlag | None = None
    """Failures in a row that open the breaker (default 5; false: this trigger off)."""
    failure_rate: Toggle[FailureRateSpec] | None = None
    slow_calls: Toggle[SlowCallsSpec] | None = None
    failure_statuses: list[StatusToken] | None = None
    """Statuses that count as failures (default 5xx, 429)."""
    open_for: AtLeastOneSecond | None = None
    """How long an open breaker rejects before a trial (default 60s, at least 1s)."""
    open_for_max: AtLeastOneSecond | None = None
    """open_for doubles on each consecutive re-trip, up to this (default 10m)."""
    half_open_calls: int | None = Field(None, ge=1)
    """Trial permits per half-open period; all must succeed (default 3)."""
    half_open_max_wait: PositiveDuration | None = None
    """A trial still running after this counts as failed (default 30s)."""
    mode: Literal["enforce", "observe", "disabled"] | None = None
    """enforce; observe (record, never reject); disabled (default enforce)."""
    share: bool | None = None
    """Publish trips to the fleet and open on peers' trips (needs state.backend: redis)."""


class BulkheadSpec(Spec):
    max_concurrent: int | None = Field(None, ge=1)
    """Attempts in flight at once (default 64)."""
    max_queued: int | None = Field(None, ge=0)
    """Attempts waiting for a slot (default 128); beyond that, rejected at once."""
    queue_timeout: Duration | None = None
    """Longest wait for a slot (default 1s)."""


class StaticSpec(Spec):
    status: int | None = Field(None, ge=100, le=599)
    """Status of the static fallback response (default 503)."""
    headers: dict[HeaderName, HeaderValue] | None = None
    body: str | None = None


class FallbackSpec(Spec):
    stale_if_error: Duration | None = None
    """Serve the last good response up to this staleness (default 1h)."""
    methods: list[Method] | None = None
    """Methods whose responses are stored and served (default GET, HEAD)."""
    on: list[FallbackCondition] | None = None
    """breaker-open, timeout, connect-failure, reset, bulkhead-full and status tokens."""
    identity_headers: list[HeaderName] | None = None
    """Extra request headers that identify a caller (cache partition)."""
    store_set_cookie: bool | None = None
    override_revalidate: bool | None = None
    """Serve stale even under must-revalidate / no-cache (default false)."""
    static: Toggle[StaticSpec] | None = None
    """The response served when no stored one fits (default: none)."""


def _check_per(value: str) -> str:
    text = value.strip()
    if text.lower() == "route":
        return "route"
    kind, colon, name = text.partition(":")
    if kind.strip().lower() == "header" and colon and _TOKEN.fullmatch(name.strip()):
        return "header:" + name.strip().lower()
    raise ValueError(f"must be route or header:NAME (e.g. header:X-Agent-Id), got {quote(value)}")


RateLimitPer = Annotated[
    str, AfterValidator(_check_per), _text_schema(r"^(route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")
]


class RateLimitSpec(Spec):
    rps: float | None = Field(None, gt=0)
    """Tokens added per second (required)."""
    burst: float | None = Field(None, ge=1)
    """Bucket size: requests allowed at once after a quiet period (default: rps, at least 1)."""
    per: RateLimitPer | None = None
    """route (one bucket, default) or header:NAME (one bucket per value of that header)."""
    shared: bool | None = None
    """Take tokens from the fleet state backend (state.backend: redis), default false."""
    max_callers: int | None = Field(None, ge=1)
    """Per-caller buckets kept (LRU), default 10000."""


class PolicySpec(Spec):
    """A named, reusable set of stage blocks."""

    timeout: TimeoutSpec | None = None
    retry: Toggle[RetrySpec] | None = None
    breaker: Toggle[BreakerSpec] | None = None
    bulkhead: Toggle[BulkheadSpec] | None = None
    fallback: Toggle[FallbackSpec] | None = None
    rate_limit: Toggle[RateLimitSpec] | None = None
    """A token bucket in front of the route; its 429 is never replaced by a fallback."""


STAGE_KEYS = ("timeout", "retry", "breaker", "bulkhead", "fallback", "rate_limit")


class FailoverSpec(Spec):
    """Ordered alternatives to the route's upstream (DESIGN §16)."""

    upstreams: list[Name] = Field(min_length=1)
    """The targets after the route's upstream (the primary), tried in this order."""
    on: list[FailoverCondition] | None = None
    """Outcomes that send the next attempt to the next target at once: connect-failure,
    reset, timeout, breaker-open, quota and status tokens (default: all five and 5xx)."""


class MatchSpec(Spec):
    path_prefix: PathPrefix | None = None
    """Raw path prefix, matched segment by segment (default /)."""
    host: HostMatch | None = None
    """Host header, case-insensitive; the port is compared only when given here."""
    methods: list[Method] | None = None


class RouteSpec(PolicySpec):
    """One route: first match wins; `policy` first, then these keys override it key by key."""

    name: Name
    match: MatchSpec | None = None
    upstream: Name
    strip_prefix: bool | None = None
    """Remove the matched prefix before forwarding (default true)."""
    policy: Name | None = None
    failover: FailoverSpec | None = None


class TlsSpec(Spec):
    verify: bool | None = None
    ca_file: str | None = None
    """PEM bundle of a private CA (relative paths: to the config file's directory)."""


class QuotaSpec(Spec):
    headers: Literal["github", "cloudinary", "huggingface", "ietf", "generic"] | None = None
    """Which provider's quota headers to read (default generic)."""
    reserve: int | None = Field(None, ge=0)
    """Hold requests back when remaining reaches this, until the reset (default 0)."""
    max_queued: int | None = Field(None, ge=0)
    """Requests waiting for the reset at once (default 128); beyond that, 429."""


class UpstreamSpec(Spec):
    url: UpstreamUrl
    """http(s)://[user:password@]host[:port][/base]; userinfo is sent as Basic auth."""
    headers: dict[HeaderName, HeaderValue] | None = None
    """Injected on every request; omitted when a ${VAR} in it is empty."""
    forwarded_headers: bool | None = None
    """Send X-Forwarded-For/-Proto/-Host to this upstream (default false)."""
    request_id: bool | None = None
    """Send a generated X-Request-Id to this upstream (default false: third parties)."""
    connect_timeout: PositiveDuration | None = None
    """A new TCP+TLS connection (default 2s)."""
    max_connections: int | None = Field(None, ge=1)
    idle_timeout: PositiveDuration | None = None
    """Pooled idle connections are closed after this (default 4s, below common servers' 5s)."""
    tls: TlsSpec | None = None
    quota: Toggle[QuotaSpec] | None = None
    """Track the provider's remaining quota and hold requests back at the reserve."""


class AdminSpec(Spec):
    listen: ListenAddress | None = None
    """Metrics, health, status and admin API (default 127.0.0.1:9901)."""
    token: str | None = None
    """Bearer token for mutations; empty: mutations refused."""
    token_file: str | None = None
    """A file holding the token (read at load), instead of token."""


class LimitsSpec(Spec):
    max_request_body: Size | None = None
    max_header_bytes: PositiveSize | None = None
    client_header_timeout: PositiveDuration | None = None
    client_body_timeout: PositiveDuration | None = None
    client_idle_timeout: PositiveDuration | None = None


class ShutdownSpec(Spec):
    quiet_period: Duration | None = None
    drain_timeout: Duration | None = None


class AccessLogSpec(Spec):
    enabled: bool | None = None
    """One JSON line per finished request (default false)."""
    sample: Ratio | None = None
    """The share of requests logged (default 1.0); errors are always logged."""
    slow: Duration | None = None
    """Log only requests at least this slow (default 0s: all); errors are always logged."""


class CacheSpec(Spec):
    max_bytes: Size | None = None
    max_entry_bytes: Size | None = None


class StateSpec(Spec):
    backend: Literal["local", "redis"] | None = None
    """local (default): each sidecar on its own; redis: shared limits, quota snapshots and
    (breaker.share) breaker trips."""
    url: RedisUrl | None = None
    """redis://[:password@]host:port/db (required with backend redis)."""
    key_prefix: Text | None = None
    """Prefix of every key and channel (default resilience-proxy)."""
    timeout: PositiveDuration | None = None
    """Bounds each Redis call, its connect included (default 50ms)."""


class PgPoolSpec(Spec):
    min_size: int | None = Field(None, ge=0)
    max_size: int | None = Field(None, ge=1)


class PgProbeSpec(Spec):
    interval: AtLeastOneSecond | None = None
    timeout: PositiveDuration | None = None
    query: Text | None = None


class PgDegradedSpec(Spec):
    latency: PositiveDuration | None = None
    utilization: Ratio | None = None
    consecutive_failures: int | None = Field(None, ge=1)


class PgCriticalSpec(Spec):
    utilization: Ratio | None = None
    consecutive_failures: int | None = Field(None, ge=1)


class PostgresSpec(Spec):
    name: Name
    dsn: Dsn
    application_name: Text | None = None
    """The agent's application_name, to find its connections server-side."""
    agent_pool_size: int | None = Field(None, ge=1)
    pool: PgPoolSpec | None = None
    probe: PgProbeSpec | None = None
    degraded: PgDegradedSpec | None = None
    critical: PgCriticalSpec | None = None
    readiness: Literal["ignore", "fail_on_critical"] | None = None


class ConfigSpec(Spec):
    """resilience-proxy configuration, version 1."""

    version: Version | None = None
    listen: ListenAddress | None = None
    """The proxy listener, host:port (default 127.0.0.1:8080)."""
    allow_remote_clients: bool | None = None
    """Allow a non-loopback listen while upstreams inject credentials."""
    admin: AdminSpec | None = None
    limits: LimitsSpec | None = None
    shutdown: ShutdownSpec | None = None
    headers_with_underscores: Literal["reject", "drop", "allow"] | None = None
    """A request header name with `_`: refused with 400 (default), dropped, or allowed."""
    access_log: AccessLogSpec | None = None
    state_file: PathOrFlag | None = None
    """Breaker state; empty: $XDG_STATE_HOME/resilience-proxy/state.json; false: off."""
    state: StateSpec | None = None
    """Fleet state (DESIGN §15): local, or shared through Redis."""
    upstreams: dict[Name, UpstreamSpec] | None = None
    policies: dict[Name, PolicySpec] | None = None
    routes: list[RouteSpec] | None = None
    cache: CacheSpec | None = None
    postgres: list[PostgresSpec] | None = None


# --- errors --------------------------------------------------------------------------------


def validation_problems(exc: ValidationError, doc: Document) -> None:
    """Add one problem per pydantic error to `doc`, at the key path and line it concerns."""
    for error in exc.errors():
        path, missing = _error_path(error, doc)
        if any(path[: len(p)] == p for p in doc.broken):
            continue  # e.g. a variable that was not set: already reported at this key
        message = _error_message(error, path, doc)
        if missing:
            message = "required"
        doc.problems.append(_problem(doc, path, message))


def _problem(doc: Document, path: Path, message: str) -> Problem:
    return Problem(doc.source, doc.line(path), format_path(path), message)


def _error_path(error: Any, doc: Document) -> tuple[Path, bool]:
    """Map a pydantic `loc` onto the document: drop union tags, keep real keys and indexes."""
    loc = tuple(error["loc"])
    node: Any = doc.data
    path: list[str | int] = []
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif last and error["type"] == "missing" and isinstance(part, str):
            path.append(part)
            return tuple(path), True
    return tuple(path), False


def _error_message(error: Any, path: Path, doc: Document) -> str:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    if doc.from_env(path):
        names = ", ".join(f"${{{name}}}" for name in doc.env_vars.get(path, ()))
        shown = f"the value of {names}" if names else "a value from the environment"
    else:
        shown = quote(value)
    if kind == "model_type" and "spec" in error["loc"]:
        return f"must be a mapping, true or false, got {shown}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", error["msg"]))
        if doc.from_env(path) and isinstance(value, str):
            message = message.replace(quote(value), shown)
        return message
    if kind == "extra_forbidden":
        return _unknown_key_message(tuple(error["loc"]))
    if kind == "too_short":
        return f"must list at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    simple = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "list_type": "must be a list",
        "literal_error": f"must be one of {ctx.get('expected', '')}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "less_than": f"must be < {ctx.get('lt')}",
    }
    if kind in simple:
        return f"{simple[kind]}, got {shown}"
    msg = str(error["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {shown}"


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    valid = _valid_keys(loc[:-1])
    key = str(loc[-1])
    if not valid:
        return "unknown key"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key; valid keys: {', '.join(valid)}"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at `loc` accepts, found by walking the annotations from ConfigSpec."""
    current: list[Any] = [ConfigSpec]
    for part in loc:
        following: list[Any] = []
        for candidate in _expand(current):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                field = candidate.model_fields.get(str(part))
                if field is not None:
                    following.append(field.annotation)
            elif typing.get_origin(candidate) is list and isinstance(part, int):
                following.extend(typing.get_args(candidate)[:1])
            elif typing.get_origin(candidate) is dict and isinstance(part, str):
                following.extend(typing.get_args(candidate)[1:2])
        if not following and part in UNION_TAGS:
            continue
        current = following
    keys: list[str] = []
    for candidate in _expand(current):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            keys.extend(candidate.model_fields)
    return keys


def _expand(candidates: list[Any]) -> list[Any]:
    """Unwrap Annotated and unions, so the walk sees the models and containers inside."""
    out: list[Any] = []
    pending = list(candidates)
    while pending:
        candidate = pending.pop()
        origin = typing.get_origin(candidate)
        if origin is Annotated:
            pending.append(typing.get_args(candidate)[0])
        elif origin is Union or origin is types.UnionType:
            pending.extend(typing.get_args(candidate))
        else:
            out.append(candidate)
    return out


# --- JSON Schema ---------------------------------------------------------------------------

_ENV_STRING: dict[str, Any] = {"type": "string", "pattern": ENV_REFERENCE_PATTERN}
_SCALAR_TYPES = frozenset(("integer", "number", "boolean"))


def json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the YAML, for editors: `resilience-proxy schema`.

    Every typed scalar also accepts a string holding a `${VAR}` reference, since values are
    expanded after parsing; durations, sizes and ratios also accept their string spellings.
    """
    schema = ConfigSpec.model_json_schema(mode="validation")
    schema = _accept_env(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "resilience-proxy configuration (version 1)",
        "description": f"Durations: {DURATION_HINT}. Sizes: 512KiB, 10MiB. Ratios: 50% or 0.5.",
    }


def _accept_env(node: Any) -> Any:
    if isinstance(node, list):
        return [_accept_env(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        # A `${...}` string may match several branches once each accepts one: anyOf, not oneOf.
        ("anyOf" if key == "oneOf" else key): value
        if key in ("propertyNames", "default", "const", "enum")
        else _accept_env(value)
        for key, value in node.items()
    }
    if "patternProperties" in out:
        out.setdefault("additionalProperties", False)  # a mapping's keys must match its pattern
    types = out.get("type")
    typed = {types} if isinstance(types, str) else set(types or ())
    if (typed & _SCALAR_TYPES) or "pattern" in out or "const" in out or "enum" in out:
        kept = {k: out.pop(k) for k in ("title", "description", "default") if k in out}
        return {**kept, "anyOf": [out, dict(_ENV_STRING)]}
    return out

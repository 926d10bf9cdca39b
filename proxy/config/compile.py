"""Validated specs → the frozen runtime objects of `proxy.config.model`.

Here live the rules that need more than one key: a route's blocks merged over its named
policy key by key, built-in defaults for absent keys, references between sections, files
named by the config (CA bundles, the admin token file), the state file's default location,
and the secrets: which values to scrub from logs (`Config.secrets`) and which to hide in
the effective config served at `GET /config` (`Config.redacted`).

Merge rule, per route and stage block: the policy's block, then the route's keys on top,
recursively (`timeout: {total: 900s}` keeps the policy's `per_try` and `idle`). `false`
turns a block off; `true` turns it on with the policy's or the built-in settings. A block
absent from both is off, except `timeout`, which always applies with its defaults. In
`failure_rate`, setting `window` or `window_calls` replaces the other.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.config.loader import Document, Path, Problem, format_path
from proxy.config.model import (
    AccessLogSettings,
    AdminSettings,
    BackoffPolicy,
    BreakerPolicy,
    BudgetPolicy,
    BulkheadPolicy,
    CacheSettings,
    Config,
    FailoverPolicy,
    FailureRatePolicy,
    FallbackPolicy,
    Limits,
    PostgresTarget,
    QuotaPolicy,
    RateLimitPolicy,
    RetryAfterPolicy,
    RetryOn,
    RetryPolicy,
    Route,
    RouteMatch,
    ShutdownPolicy,
    SlowCallPolicy,
    StateSettings,
    StaticFallback,
    StatusSet,
    TimeoutPolicy,
    TlsSettings,
    Upstream,
    status_token_members,
)
from proxy.config.schema import (
    CONDITIONS_FAILOVER,
    CONDITIONS_FALLBACK,
    CONDITIONS_RETRY,
    STAGE_KEYS,
    UNINJECTABLE_HEADERS,
    AccessLogSpec,
    AdminSpec,
    BackoffSpec,
    BreakerSpec,
    BudgetSpec,
    BulkheadSpec,
    CacheSpec,
    ConfigSpec,
    FailoverSpec,
    FailureRateSpec,
    FallbackSpec,
    MatchSpec,
    PgCriticalSpec,
    PgDegradedSpec,
    PgPoolSpec,
    PgProbeSpec,
    PolicySpec,
    PostgresSpec,
    QuotaSpec,
    RateLimitSpec,
    RetryAfterSpec,
    RetrySpec,
    RouteSpec,
    ShutdownSpec,
    Spec,
    StateSpec,
    StaticSpec,
    TimeoutSpec,
    UpstreamSpec,
    is_loopback,
    split_host_port,
)
from proxy.config.units import format_duration, format_size, quote

REDACTED = "<redacted>"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"
# Shorter secrets are still listed in Config.secrets, but scrubbing every string that
# contains, say, "ab" would blank the whole effective config.
_MIN_SCRUB_LENGTH = 4

T = TypeVar("T")
_URL_PASSWORD = re.compile(r"(//[^/@:\s]*):[^/@\s]*@")  # scheme://user:PASSWORD@host
_USERINFO = re.compile(r"//[^/@\s]*@")  # scheme://USERINFO@host
_TRUE_WORDS = frozenset(("true", "yes", "on", "1", "t", "y"))  # what pydantic reads as true


def check_raw(doc: Document, *, require_routes: bool = True) -> None:
    """Rules checked on the raw tree, before type validation, so that they are reported
    together with every type error rather than once those are fixed."""
    data: dict[str, Any] = doc.data
    version = data.get("version")
    from_env = isinstance(version, str) and ("version",) in doc.expanded
    unread = ("version",) in doc.broken  # e.g. 5000 digits: already reported
    if "version" in data and not (type(version) is int or from_env or unread):
        doc.problem(("version",), f"must be the integer 1, got {quote(version)}")
    routes = data.get("routes")
    if require_routes and (routes is None or routes == []):
        doc.problem(
            ("routes",),
            "no routes: every request would be answered 404; add at least one route",
        )
    for base in _breaker_blocks(data):
        rate = _dig(data, (*base, "failure_rate"))
        if isinstance(rate, dict) and "window" in rate and "window_calls" in rate:
            path = (*base, "failure_rate")
            # Not marked broken: the block's other values are still checked.
            doc.problems.append(
                Problem(
                    doc.source,
                    doc.line(path),
                    format_path(path),
                    "set window or window_calls, not both",
                )
            )
    _check_remote_credentials(doc, data)


def _dig(data: Any, path: Path) -> Any:
    for part in path:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _breaker_blocks(data: dict[str, Any]) -> list[Path]:
    blocks: list[Path] = [("policies", name, "breaker") for name in _mapping(data.get("policies"))]
    routes = data.get("routes")
    if isinstance(routes, list):
        blocks.extend(("routes", index, "breaker") for index in range(len(routes)))
    return blocks


def _check_remote_credentials(doc: Document, data: dict[str, Any]) -> None:
    """A non-loopback listen while upstreams inject credentials needs allow_remote_clients."""
    listen = data.get("listen")
    if not isinstance(listen, str):
        return  # absent: the loopback default; anything else is a type error
    try:
        host, _ = split_host_port(listen)
    except ValueError:
        return  # reported by validation
    allow = data.get("allow_remote_clients")
    if is_loopback(host) or allow is True or str(allow).strip().lower() in _TRUE_WORDS:
        return
    injecting = sorted(
        name
        for name, upstream in _mapping(data.get("upstreams")).items()
        if isinstance(upstream, dict) and _injects_credentials(doc, name, upstream)
    )
    if injecting:
        doc.problem(
            ("listen",),
            f"a non-loopback address while upstream(s) {', '.join(injecting)} inject "
            "credentials: anyone who can reach the proxy could use them; listen on "
            "127.0.0.1 or set allow_remote_clients: true",
        )


def _injects_credentials(doc: Document, name: str, upstream: dict[str, Any]) -> bool:
    headers = upstream.get("headers")
    if isinstance(headers, dict) and any(
        ("upstreams", name, "headers", key) not in doc.empty_vars for key in headers
    ):
        return True
    url = upstream.get("url")
    if not isinstance(url, str):
        return False
    try:
        userinfo, at, _ = urlsplit(url.strip()).netloc.rpartition("@")
    except ValueError:
        return False
    user, _, password = userinfo.partition(":")
    return bool(at and (unquote(user) or unquote(password)))


def check_references(doc: Document) -> None:
    """On the raw tree, before type validation: names unique, referenced names defined.

    Runs on the raw data so these problems are reported together with type errors.
    """
    data = doc.data if isinstance(doc.data, dict) else {}
    upstreams: dict[str, Any] = _mapping(data.get("upstreams"))
    policies: dict[str, Any] = _mapping(data.get("policies"))
    for section, references in (("routes", True), ("postgres", False)):
        items = data.get(section)
        first: dict[str, int] = {}
        for index, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):
                continue
            name = item.get("name")
            if isinstance(name, str) and name in first:
                where = (section, first[name], "name")
                doc.problem(
                    (section, index, "name"),
                    f"duplicate {section.rstrip('s')} name {quote(name)} "
                    f"(first at {section}[{first[name]}], "
                    f"line {doc.line(where)})",
                )
            elif isinstance(name, str):
                first[name] = index
            if references:
                _check_reference(doc, (section, index, "upstream"), item, "upstream", upstreams)
                _check_reference(doc, (section, index, "policy"), item, "policy", policies)
                _check_failover_targets(doc, index, item, upstreams)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check_reference(
    doc: Document, path: Path, item: dict[str, Any], key: str, defined: dict[str, Any]
) -> None:
    name = item.get(key)
    if isinstance(name, str) and name not in defined:
        names = ", ".join(sorted(defined)) or "none"
        kind = "upstream" if key == "upstream" else "policy"
        doc.problem(path, f"unknown {kind} {quote(name)} (defined: {names})")


def _check_failover_targets(
    doc: Document, index: int, route: dict[str, Any], defined: dict[str, Any]
) -> None:
    """`routes[i].failover.upstreams`: defined, each once, and not the primary again."""
    failover = route.get("failover")
    targets = failover.get("upstreams") if isinstance(failover, dict) else None
    if not isinstance(targets, list):
        return
    primary = route.get("upstream")
    first: dict[str, int] = {}
    for position, name in enumerate(targets):
        if not isinstance(name, str):
            continue
        path: Path = ("routes", index, "failover", "upstreams", position)
        if name == primary:
            doc.problem(
                path,
                f"{quote(name)} is the route's upstream (the primary, tried first); "
                "list only the alternatives",
            )
        elif name in first:
            doc.problem(
                path,
                f"{quote(name)} is listed twice "
                f"(first at failover.upstreams[{first[name]}]): each target is tried once",
            )
        elif name not in defined:
            names = ", ".join(sorted(defined)) or "none"
            doc.problem(path, f"unknown upstream {quote(name)} (defined: {names})")
        first.setdefault(name, position)


def compile_config(
    spec: ConfigSpec, doc: Document, *, base_dir: str, env: Mapping[str, str], digest: str
) -> Config | None:
    """Build the runtime Config; None when a problem was added to `doc.problems`."""
    return _Compiler(doc, base_dir, env).compile(spec, digest)


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a merged block's keys came from: the route's block first, then its policy's."""

    doc: Document
    bases: tuple[Path, ...]

    def path(self, *sub: str) -> Path:
        for base in self.bases:
            if self.doc.has((*base, *sub)):
                return (*base, *sub)
        return (*self.bases[0], *sub)


def merge(base: Any, over: Any) -> Any:
    """One key of a route over the same key of its policy (see the module docstring)."""
    if over is None:
        return base
    if over is True:
        return base if base is not None and not isinstance(base, bool) else True
    if isinstance(over, Spec) and isinstance(base, Spec):
        values = {name: getattr(base, name) for name in base.model_fields_set}
        if isinstance(over, FailureRateSpec) and over.model_fields_set & {"window", "window_calls"}:
            values.pop("window", None)
            values.pop("window_calls", None)
        for name in over.model_fields_set:
            values[name] = merge(values.get(name), getattr(over, name))
        return type(over).model_construct(_fields_set=set(values), **values)
    return over


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _limit(value: float | None, default: float | None) -> float | None:
    """A timeout: absent → default, `off` (inf) → None (no limit)."""
    if value is None:
        return default
    return None if math.isinf(value) else value


def _status_set(tokens: tuple[str, ...]) -> StatusSet:
    statuses: frozenset[int] = frozenset()
    for token in tokens:
        statuses |= status_token_members(token)
    return StatusSet(tokens, statuses)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Compiler:
    def __init__(self, doc: Document, base_dir: str, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.base_dir = base_dir
        self.env = env
        self.secrets: set[str] = set(doc.secrets)
        # The values /config hides wherever they appear: credentials, not every ${VAR}.
        self.credentials: set[str] = set(doc.file_secrets)
        self.route_policies: list[str | None] = []

    def problem(self, path: Path, message: str) -> None:
        self.doc.problem(path, message)

    def shown(self, path: Path, text: str) -> str:
        """`text` for a message, unless the value came from the environment (never shown)."""
        return "a value from the environment" if self.doc.from_env(path) else text

    def file_path(self, value: str) -> str:
        """A path from the config: `~` expanded; relative paths start at the config's directory."""
        if value.startswith("~"):
            home = self.env.get("HOME") or os.path.expanduser("~")
            value = home + value[1:]
        if os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(self.base_dir, value))

    def misordered(
        self,
        at: _Origin,
        low: tuple[str, ...],
        low_value: float,
        high: tuple[str, ...],
        high_value: float,
    ) -> None:
        """Durations `low` > `high` in a merged block: report at the one the route itself set
        (the route overrode the policy there), else at `high`."""
        low_path, high_path = at.path(*low), at.path(*high)
        low_text = self.shown(low_path, format_duration(low_value))
        high_text = self.shown(high_path, format_duration(high_value))
        if (
            low_path[: len(at.bases[0])] == at.bases[0]
            and high_path[: len(at.bases[0])] != at.bases[0]
        ):
            self.problem(low_path, f"must be <= {'.'.join(high)} ({high_text}), got {low_text}")
        else:
            self.problem(high_path, f"must be >= {'.'.join(low)} ({low_text}), got {high_text}")

    # --- the whole file ---------------------------------------------------------------

    def compile(self, spec: ConfigSpec, digest: str) -> Config | None:
        host, port = split_host_port(spec.listen or DEFAULT_LISTEN)
        upstreams = {
            name: self.upstream(name, upstream) for name, upstream in (spec.upstreams or {}).items()
        }
        policies = spec.policies or {}
        for name, policy in policies.items():
            # Checked on their own too, so a policy no route uses is still validated.
            self.stages(policy, _Origin(self.doc, (("policies", name),)))
            self.rate_limit(
                policy.rate_limit, _Origin(self.doc, (("policies", name, "rate_limit"),))
            )
        routes = []
        for index, route_spec in enumerate(spec.routes or []):
            self.route_policies.append(route_spec.policy)
            route = self.route(index, route_spec, upstreams, policies)
            if route is not None:
                routes.append(route)
        allow_remote = _or(spec.allow_remote_clients, False)
        shutdown = spec.shutdown or ShutdownSpec()
        config = Config(
            listen_host=host,
            listen_port=port,
            allow_remote_clients=allow_remote,
            admin=self.admin(spec),
            limits=self.limits(spec),
            shutdown=ShutdownPolicy(
                quiet_period=_or(shutdown.quiet_period, ShutdownPolicy().quiet_period),
                drain_timeout=_or(shutdown.drain_timeout, ShutdownPolicy().drain_timeout),
            ),
            headers_with_underscores=spec.headers_with_underscores or "reject",
            access_log=self.access_log(spec),
            state_file=self.state_file(spec.state_file),
            state=self.state(spec.state),
            upstreams=upstreams,
            routes=tuple(routes),
            cache=self.cache(spec),
            postgres=tuple(self.postgres(i, pg) for i, pg in enumerate(spec.postgres or [])),
            source=self.doc.source,
            hash=digest,
        )
        if self.doc.problems:
            return None
        secrets = frozenset(s for s in self.secrets if s)
        tree = effective_tree(config, self.route_policies)
        credentials = frozenset(s for s in self.credentials if s)
        redacted = _Redactor(self.doc, self.route_policies, credentials).tree(tree)
        return replace(config, redacted=redacted, secrets=secrets)

    def access_log(self, spec: ConfigSpec) -> AccessLogSettings:
        block = spec.access_log or AccessLogSpec()
        default = AccessLogSettings()
        return AccessLogSettings(
            enabled=_or(block.enabled, default.enabled),
            sample=_or(block.sample, default.sample),
            slow=_or(block.slow, default.slow),
        )

    def admin(self, spec: ConfigSpec) -> AdminSettings:
        admin = spec.admin or AdminSpec()
        host, port = split_host_port(admin.listen or DEFAULT_ADMIN_LISTEN)
        token = (admin.token or "").strip()
        token_file = (admin.token_file or "").strip()
        if token and token_file:
            self.problem(("admin", "token_file"), "set admin.token or admin.token_file, not both")
        elif token_file:
            path = self.file_path(token_file)
            try:
                token = self.doc.read_file(path)  # bounded: `/dev/zero` is refused
            except ValueError as exc:
                self.problem(("admin", "token_file"), f"cannot read {quote(path)}: {exc}")
            else:
                if not token:
                    self.problem(("admin", "token_file"), f"{quote(path)} is empty")
        if token:
            self.secrets.add(token)
            self.credentials.add(token)
        return AdminSettings(host=host, port=port, token=token or None)

    def limits(self, spec: ConfigSpec) -> Limits:
        limits = spec.limits
        default = Limits()
        if limits is None:
            return default
        return Limits(
            max_request_body=_or(limits.max_request_body, default.max_request_body),
            max_header_bytes=_or(limits.max_header_bytes, default.max_header_bytes),
            client_header_timeout=_or(limits.client_header_timeout, default.client_header_timeout),
            client_body_timeout=_or(limits.client_body_timeout, default.client_body_timeout),
            client_idle_timeout=_or(limits.client_idle_timeout, default.client_idle_timeout),
        )

    def state(self, spec: StateSpec | None) -> StateSettings:
        """The fleet state backend; its URL's password joins the secrets."""
        default, given = StateSettings(), spec or StateSpec()
        backend = _or(given.backend, default.backend)
        if backend == "redis" and not given.url:
            self.problem(("state", "url"), "required with backend: redis")
        if given.url:
            self.secrets.update(display_dsn(given.url)[1])  # user:password@ and ?password=
        return StateSettings(
            backend=backend,
            url=given.url or None,
            key_prefix=_or(given.key_prefix, default.key_prefix).strip(),
            timeout=_or(given.timeout, default.timeout),
        )

    def state_file(self, value: str | bool | None) -> str | None:
        """Explicit path; else `$XDG_STATE_HOME/resilience-proxy/state.json`; `false`: off."""
        if value is False:
            return None
        if isinstance(value, str) and value.strip():
            return self.file_path(value.strip())
        state_home = self.env.get("XDG_STATE_HOME", "")
        if not os.path.isabs(state_home):  # the XDG spec: relative values are ignored
            home = self.env.get("HOME") or os.path.expanduser("~")
            state_home = os.path.join(home, ".local", "state")
        return os.path.join(state_home, "resilience-proxy", "state.json")

    def cache(self, spec: ConfigSpec) -> CacheSettings:
        default, given = CacheSettings(), spec.cache or CacheSpec()
        cache = CacheSettings(
            max_bytes=_or(given.max_bytes, default.max_bytes),
            max_entry_bytes=_or(given.max_entry_bytes, default.max_entry_bytes),
        )
        if cache.max_entry_bytes > cache.max_bytes:
            path: Path = ("cache", "max_entry_bytes")
            limit = self.shown(("cache", "max_bytes"), format_size(cache.max_bytes))
            self.problem(
                path,
                f"must be <= cache.max_bytes ({limit}), got "
                f"{self.shown(path, format_size(cache.max_entry_bytes))}",
            )
        return cache

    # --- upstreams --------------------------------------------------------------------

    def upstream(self, name: str, spec: UpstreamSpec) -> Upstream:
        path: Path = ("upstreams", name)
        parts = urlsplit(spec.url)
        userinfo_text, at, hostport = parts.netloc.rpartition("@")
        userinfo: tuple[str, str] | None = None
        if at:
            user, _, password = userinfo_text.partition(":")
            user, password = unquote(user), unquote(password)
            # `https://${KEY:-}:${SECRET:-}@host` with either one unset sends nothing, as an
            # injected header with an empty ${VAR} is omitted (rather than Basic "key:").
            half = (*path, "url") in self.doc.empty_vars and not (user and password)
            if (user or password) and not half:
                userinfo = (user, password)
                self.secrets.add(password or user)
                self.credentials.add(password or user)
        scheme = parts.scheme.lower()
        base_path = parts.path.rstrip("/")
        tls = TlsSettings()
        if spec.tls is not None:
            ca_file = spec.tls.ca_file.strip() if spec.tls.ca_file else None
            if ca_file:
                ca_file = self.file_path(ca_file)
                if not os.path.isfile(ca_file) or not os.access(ca_file, os.R_OK):
                    self.problem((*path, "tls", "ca_file"), f"no readable file at {quote(ca_file)}")
            tls = TlsSettings(verify=_or(spec.tls.verify, True), ca_file=ca_file)
        default = Upstream(name=name, url="", scheme="", host="", base_path="")
        return Upstream(
            name=name,
            url=f"{scheme}://{hostport}{base_path}",
            scheme=scheme,
            host=hostport,
            base_path=base_path,
            headers=self.injected_headers(path, spec),
            missing_headers=self.missing_headers(path),
            forwarded_headers=_or(spec.forwarded_headers, default.forwarded_headers),
            request_id=_or(spec.request_id, default.request_id),
            connect_timeout=_or(spec.connect_timeout, default.connect_timeout),
            max_connections=_or(spec.max_connections, default.max_connections),
            idle_timeout=_or(spec.idle_timeout, default.idle_timeout),
            tls=tls,
            userinfo=userinfo,
            quota=self.quota(spec.quota),
        )

    def quota(self, spec: QuotaSpec | bool | None) -> QuotaPolicy | None:
        given = _block(spec, QuotaSpec)
        if given is None:
            return None
        default = QuotaPolicy()
        return QuotaPolicy(
            headers=_or(given.headers, default.headers),
            reserve=_or(given.reserve, default.reserve),
            max_queued=_or(given.max_queued, default.max_queued),
        )

    def rate_limit(self, spec: RateLimitSpec | bool | None, at: _Origin) -> RateLimitPolicy | None:
        if spec is True:
            self.problem(at.path(), "needs rps, not just true")
            return None
        given = _block(spec, RateLimitSpec)
        if given is None:
            return None
        if given.rps is None:
            self.problem(at.path("rps"), "required")
            return None
        per = _or(given.per, "route")
        return RateLimitPolicy(
            rps=given.rps,
            burst=_or(given.burst, max(1.0, float(math.ceil(given.rps)))),
            per_header=per[len("header:") :] if per.startswith("header:") else None,
            shared=_or(given.shared, False),
            max_callers=_or(given.max_callers, 10_000),
        )

    def missing_headers(self, path: Path) -> tuple[str, ...]:
        """The injected headers left out because a ${VAR} in them expanded to empty; also
        `Authorization` when URL userinfo (`https://${KEY:-}:${SECRET:-}@host`) lost its user
        or its password that way, since that userinfo is the Basic credential it sends."""
        raw = self.doc.data["upstreams"][path[1]].get("headers") or {}
        missing = [name for name in raw if (*path, "headers", name) in self.doc.empty_vars]
        if (*path, "url") in self.doc.empty_vars:
            userinfo, at, _ = urlsplit(
                str(self.doc.data["upstreams"][path[1]]["url"])
            ).netloc.rpartition("@")
            user, _, password = userinfo.partition(":")
            if at and not (user and password) and "authorization" not in (n.lower() for n in raw):
                missing.append("Authorization")
        return tuple(missing)

    def injected_headers(self, path: Path, spec: UpstreamSpec) -> tuple[tuple[str, str], ...]:
        raw = self.doc.data["upstreams"][path[1]].get("headers") or {}
        values = spec.headers or {}
        headers: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        for written in raw:  # the keys as written, to find each one's line and expansion
            name = written.lower()
            where: Path = (*path, "headers", written)
            if name in seen:
                self.problem(where, f"duplicate header (names are case-insensitive: {seen[name]})")
                continue
            seen[name] = written
            if name in UNINJECTABLE_HEADERS:
                self.problem(where, "this header is set by the proxy and cannot be injected")
                continue
            if where in self.doc.empty_vars:
                continue  # a ${VAR} in it is empty: send nothing rather than "Bearer "
            value = values[name]
            # Sent as its UTF-8 bytes: the upstream client writes header strs as latin-1,
            # one byte per character, so this str carries exactly those bytes.
            headers.append((name, value.encode("utf-8").decode("latin-1")))
            self.secrets.add(value)
            self.credentials.add(value)
        return tuple(headers)

    # --- routes and their stages -------------------------------------------------------

    def route(
        self,
        index: int,
        spec: RouteSpec,
        upstreams: Mapping[str, Upstream],
        policies: Mapping[str, PolicySpec],
    ) -> Route | None:
        upstream = upstreams.get(spec.upstream)
        policy = policies.get(spec.policy) if spec.policy else None
        if upstream is None or (spec.policy and policy is None):
            return None  # reported by check_references
        bases: tuple[Path, ...] = (("routes", index),)
        merged: PolicySpec = spec
        if policy is not None and spec.policy:
            bases = (("routes", index), ("policies", spec.policy))
            merged = PolicySpec.model_construct(
                _fields_set=set(STAGE_KEYS),
                **{key: merge(getattr(policy, key), getattr(spec, key)) for key in STAGE_KEYS},
            )
        timeout, retry, breaker, bulkhead, fallback = self.stages(merged, _Origin(self.doc, bases))
        rate_limit = self.rate_limit(
            merged.rate_limit, _Origin(self.doc, tuple((*base, "rate_limit") for base in bases))
        )
        failover = self.failover(spec.failover, upstreams) if spec.failover is not None else None
        match = spec.match or MatchSpec()
        return Route(
            name=spec.name,
            match=RouteMatch(
                path_prefix=_or(match.path_prefix, "/"),
                host=match.host,
                methods=frozenset(match.methods) if match.methods else None,
            ),
            upstream=upstream,
            strip_prefix=_or(spec.strip_prefix, True),
            timeout=timeout,
            retry=retry,
            breaker=breaker,
            bulkhead=bulkhead,
            fallback=fallback,
            rate_limit=rate_limit,
            failover=failover,
        )

    def failover(self, spec: FailoverSpec, upstreams: Mapping[str, Upstream]) -> FailoverPolicy:
        """The targets after the primary (unknown names were reported by check_references)."""
        default = FailoverPolicy(())
        targets = tuple(dict.fromkeys(n for n in spec.upstreams if n in upstreams))
        conditions, statuses = default.conditions, default.statuses
        if spec.on is not None:
            tokens = tuple(dict.fromkeys(spec.on))
            conditions = frozenset(t for t in tokens if t in CONDITIONS_FAILOVER)
            statuses = _status_set(tuple(t for t in tokens if t not in CONDITIONS_FAILOVER))
        return FailoverPolicy(tuple(upstreams[n] for n in targets), conditions, statuses)

    def stages(
        self, spec: PolicySpec, origin: _Origin
    ) -> tuple[
        TimeoutPolicy,
        RetryPolicy | None,
        BreakerPolicy | None,
        BulkheadPolicy | None,
        FallbackPolicy | None,
    ]:
        def sub(key: str) -> _Origin:
            return _Origin(self.doc, tuple((*base, key) for base in origin.bases))

        retry = _block(spec.retry, RetrySpec)
        breaker = _block(spec.breaker, BreakerSpec)
        bulkhead = _block(spec.bulkhead, BulkheadSpec)
        fallback = _block(spec.fallback, FallbackSpec)
        return (
            self.timeout(spec.timeout or TimeoutSpec()),
            self.retry(retry, sub("retry")) if retry else None,
            self.breaker(breaker, sub("breaker")) if breaker else None,
            self.bulkhead(bulkhead) if bulkhead else None,
            self.fallback(fallback, sub("fallback")) if fallback else None,
        )

    def timeout(self, spec: TimeoutSpec) -> TimeoutPolicy:
        default = TimeoutPolicy()
        return TimeoutPolicy(
            total=_limit(spec.total, default.total),
            per_try=_limit(spec.per_try, default.per_try),
            idle=_limit(spec.idle, default.idle),
        )

    def retry(self, spec: RetrySpec, at: _Origin) -> RetryPolicy:
        default = RetryPolicy()
        backoff_spec = spec.backoff or BackoffSpec()
        after = spec.retry_after or RetryAfterSpec()
        budget_spec = spec.budget or BudgetSpec()
        backoff = BackoffPolicy(
            initial=_or(backoff_spec.initial, default.backoff.initial),
            max=_or(backoff_spec.max, default.backoff.max),
            multiplier=_or(backoff_spec.multiplier, default.backoff.multiplier),
            jitter=_or(backoff_spec.jitter, default.backoff.jitter),
        )
        if backoff.max < backoff.initial:
            self.misordered(
                at, ("backoff", "initial"), backoff.initial, ("backoff", "max"), backoff.max
            )
        on = default.on
        if spec.on is not None:
            tokens = tuple(dict.fromkeys(spec.on))
            statuses = tuple(t for t in tokens if t not in CONDITIONS_RETRY)
            on = RetryOn(
                connect_failure="connect-failure" in tokens,
                reset="reset" in tokens,
                timeout="timeout" in tokens,
                statuses=_status_set(statuses),
                tokens=tokens,
            )
        idempotency_header = default.idempotency_header
        if spec.idempotency_header is not None:
            idempotency_header = spec.idempotency_header or None
        return RetryPolicy(
            max_attempts=_or(spec.max_attempts, default.max_attempts),
            backoff=backoff,
            on=on,
            methods=frozenset(spec.methods) if spec.methods is not None else default.methods,
            idempotency_header=idempotency_header,
            retry_after=RetryAfterPolicy(
                honor=_or(after.honor, default.retry_after.honor),
                max=_or(after.max, default.retry_after.max),
            ),
            budget=BudgetPolicy(
                ratio=_or(budget_spec.ratio, default.budget.ratio),
                min_per_second=_or(budget_spec.min_per_second, default.budget.min_per_second),
                window=_or(budget_spec.window, default.budget.window),
            ),
            max_body=_or(spec.max_body, default.max_body),
        )

    def breaker(self, spec: BreakerSpec, at: _Origin) -> BreakerPolicy:
        default = BreakerPolicy()
        consecutive: int | None = default.consecutive_failures
        if spec.consecutive_failures is False:
            consecutive = None
        elif spec.consecutive_failures is not None and spec.consecutive_failures is not True:
            consecutive = spec.consecutive_failures
        failure_rate: FailureRatePolicy | None = default.failure_rate
        if spec.failure_rate is False:
            failure_rate = None
        elif isinstance(spec.failure_rate, FailureRateSpec):
            rate, base = spec.failure_rate, FailureRatePolicy()
            failure_rate = FailureRatePolicy(
                threshold=_or(rate.threshold, base.threshold),
                window=None if rate.window_calls is not None else _or(rate.window, base.window),
                window_calls=rate.window_calls,
                min_calls=_or(rate.min_calls, base.min_calls),
            )
        slow_calls = None
        if spec.slow_calls is True:
            self.problem(at.path("slow_calls"), "needs a duration and a threshold, not just true")
        elif spec.slow_calls is not None and spec.slow_calls is not False:
            slow_calls = SlowCallPolicy(spec.slow_calls.duration, spec.slow_calls.threshold)
        open_for = _or(spec.open_for, default.open_for)
        open_for_max = _or(spec.open_for_max, max(default.open_for_max, open_for))
        if open_for_max < open_for:
            self.misordered(at, ("open_for",), open_for, ("open_for_max",), open_for_max)
        statuses = default.failure_statuses
        if spec.failure_statuses is not None:
            statuses = _status_set(tuple(dict.fromkeys(spec.failure_statuses)))
        return BreakerPolicy(
            consecutive_failures=consecutive,
            failure_rate=failure_rate,
            slow_calls=slow_calls,
            failure_statuses=statuses,
            open_for=open_for,
            open_for_max=open_for_max,
            half_open_calls=_or(spec.half_open_calls, default.half_open_calls),
            half_open_max_wait=_or(spec.half_open_max_wait, default.half_open_max_wait),
            mode=_or(spec.mode, default.mode),
            share=_or(spec.share, default.share),
        )

    def bulkhead(self, spec: BulkheadSpec) -> BulkheadPolicy:
        default = BulkheadPolicy()
        return BulkheadPolicy(
            max_concurrent=_or(spec.max_concurrent, default.max_concurrent),
            max_queued=_or(spec.max_queued, default.max_queued),
            queue_timeout=_or(spec.queue_timeout, default.queue_timeout),
        )

    def fallback(self, spec: FallbackSpec, at: _Origin) -> FallbackPolicy:
        default = FallbackPolicy()
        conditions, statuses = default.conditions, default.statuses
        if spec.on is not None:
            tokens = tuple(dict.fromkeys(spec.on))
            conditions = frozenset(t for t in tokens if t in CONDITIONS_FALLBACK)
            statuses = _status_set(tuple(t for t in tokens if t not in CONDITIONS_FALLBACK))
        static = default.static
        if spec.static is True:
            static = StaticFallback()
        elif isinstance(spec.static, StaticSpec):
            static = StaticFallback(
                status=_or(spec.static.status, StaticFallback().status),
                headers=tuple((spec.static.headers or {}).items()),
                body=(spec.static.body or "").encode("utf-8"),
            )
        identity = default.identity_headers
        if spec.identity_headers is not None:
            identity = tuple(dict.fromkeys(spec.identity_headers))
        return FallbackPolicy(
            stale_if_error=_or(spec.stale_if_error, default.stale_if_error),
            methods=frozenset(spec.methods) if spec.methods is not None else default.methods,
            conditions=conditions,
            statuses=statuses,
            identity_headers=identity,
            store_set_cookie=_or(spec.store_set_cookie, default.store_set_cookie),
            override_revalidate=_or(spec.override_revalidate, default.override_revalidate),
            static=static,
        )

    # --- postgres ---------------------------------------------------------------------

    def postgres(self, index: int, spec: PostgresSpec) -> PostgresTarget:
        path: Path = ("postgres", index)
        display, passwords = display_dsn(spec.dsn)
        self.secrets.update(passwords)
        self.credentials.update(passwords)
        default = PostgresTarget(name="", dsn="", display_dsn="")
        pool, probe = spec.pool or PgPoolSpec(), spec.probe or PgProbeSpec()
        degraded, critical = spec.degraded or PgDegradedSpec(), spec.critical or PgCriticalSpec()
        target = PostgresTarget(
            name=spec.name,
            dsn=spec.dsn,
            display_dsn=display,
            application_name=_or(spec.application_name, default.application_name),
            agent_pool_size=spec.agent_pool_size,
            pool_min_size=_or(pool.min_size, default.pool_min_size),
            pool_max_size=_or(pool.max_size, default.pool_max_size),
            probe_interval=_or(probe.interval, default.probe_interval),
            probe_timeout=_or(probe.timeout, default.probe_timeout),
            probe_query=_or(probe.query, default.probe_query),
            degraded_latency=_or(degraded.latency, default.degraded_latency),
            degraded_utilization=_or(degraded.utilization, default.degraded_utilization),
            degraded_consecutive_failures=_or(
                degraded.consecutive_failures, default.degraded_consecutive_failures
            ),
            critical_utilization=_or(critical.utilization, default.critical_utilization),
            critical_consecutive_failures=_or(
                critical.consecutive_failures, default.critical_consecutive_failures
            ),
            readiness=_or(spec.readiness, default.readiness),
        )
        if target.pool_min_size > target.pool_max_size:
            where: Path = (*path, "pool", "min_size")
            self.problem(
                where,
                f"must be <= pool.max_size ({target.pool_max_size}), got {target.pool_min_size}",
            )
        if target.critical_utilization < target.degraded_utilization:
            where = (*path, "critical", "utilization")
            degraded_shown = f"{target.degraded_utilization:.0%}"
            degraded_shown = self.shown((*path, "degraded", "utilization"), degraded_shown)
            self.problem(
                where,
                f"must be >= degraded.utilization ({degraded_shown}), "
                f"got {self.shown(where, f'{target.critical_utilization:.0%}')}",
            )
        return target


def warn_unreachable(doc: Document, routes: Sequence[Route]) -> None:
    """Warn about each route no request can reach: a dot-segment in its prefix (such
    requests get 400), or an earlier route that matches everything it would."""
    for index, route in enumerate(routes):
        if any(_is_dot_segment(segment) for segment in route.match.path_prefix.split("/")):
            doc.warn(
                ("routes", index, "match", "path_prefix"),
                "contains a dot-segment (. or ..): requests with one are refused with 400, "
                "so this route never matches",
            )
            continue
        for position, first in enumerate(routes[:index]):
            if _covers(first.match, route.match):
                doc.warn(
                    ("routes", index),
                    f"never matches: routes[{position}] ({first.name}) comes first and "
                    "matches every request this route would (first match wins); move this "
                    "route above it or narrow its match",
                )
                break


def _is_dot_segment(segment: str) -> bool:
    lowered = segment.lower().replace("%2e", ".")
    return lowered in (".", "..")


def _host_name(host: str) -> str:
    """`example.com:8443` → `example.com`; `[::1]:80` → `[::1]` (a match host, lower-case)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


def _covers(first: RouteMatch, later: RouteMatch) -> bool:
    """True when every request `later` matches is matched by `first` (see RouteRuntime)."""
    a, b = first.path_prefix.rstrip("/"), later.path_prefix.rstrip("/")
    if a and not (b == a or b.startswith(a + "/")):
        return False
    if first.host is not None:
        if later.host is None:
            return False
        port_given = first.host != _host_name(first.host)
        if first.host != (later.host if port_given else _host_name(later.host)):
            return False
    if first.methods is not None:
        return later.methods is not None and later.methods <= first.methods
    return True


def _block(value: Spec | bool | None, kind: type[T]) -> T | None:
    """A merged stage block: absent or `false` → off; `true` → on with built-in settings."""
    if value is None or value is False:
        return None
    if value is True:
        return kind()
    assert isinstance(value, kind)
    return value


def display_dsn(dsn: str) -> tuple[str, list[str]]:
    """The DSN with its password(s) replaced by `<redacted>`, and the passwords themselves.

    Covers `user:password@` and the `password=` / `sslpassword=` query parameters.
    """
    scheme, sep, rest = dsn.partition("://")
    netloc, slash, tail = rest.partition("/")
    passwords: list[str] = []
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        passwords.append(unquote(password))
        netloc = f"{user}:{REDACTED}@{hosts}"
    path, question, query = tail.partition("?")
    if question:
        pairs = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key.lower() in ("password", "sslpassword"):
                passwords.append(value)
                pairs.append(f"{key}={REDACTED}")
            else:
                pairs.append(f"{key}={value}")
        query = "&".join(pairs)
    return f"{scheme}{sep}{netloc}{slash}{path}{question}{query}", [p for p in passwords if p]


# --- the effective config, for GET /config ---------------------------------------------


def effective_tree(config: Config, policies: Sequence[str | None] = ()) -> dict[str, Any]:
    """The compiled config in the YAML's shape, as plain JSON-able values.

    Durations are seconds, sizes bytes, ratios in [0, 1]; policies are already merged into
    routes (`policies[i]` names route i's policy, for the record). Injected header values,
    URL userinfo, DSN passwords and the admin token are replaced here; values taken from
    `${VAR}` are replaced by `_Redactor`.
    """
    return {
        "version": 1,
        "listen": _join_host_port(config.listen_host, config.listen_port),
        "allow_remote_clients": config.allow_remote_clients,
        "admin": {
            "listen": _join_host_port(config.admin.host, config.admin.port),
            "token": REDACTED if config.admin.token else None,
        },
        "limits": asdict(config.limits),
        "shutdown": asdict(config.shutdown),
        "headers_with_underscores": config.headers_with_underscores,
        "access_log": asdict(config.access_log),
        "state_file": config.state_file,
        "state": {
            "backend": config.state.backend,
            "url": display_dsn(config.state.url)[0] if config.state.url else None,
            "key_prefix": config.state.key_prefix,
            "timeout": config.state.timeout,
        },
        "upstreams": {name: _upstream_tree(up) for name, up in config.upstreams.items()},
        "routes": [
            _route_tree(route, policies[i] if i < len(policies) else None)
            for i, route in enumerate(config.routes)
        ],
        "cache": asdict(config.cache),
        "postgres": [_postgres_tree(target) for target in config.postgres],
    }


def _upstream_tree(upstream: Upstream) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "url": upstream.url,
        "headers": {name: REDACTED for name, _ in upstream.headers},
        "forwarded_headers": upstream.forwarded_headers,
        "request_id": upstream.request_id,
        "connect_timeout": upstream.connect_timeout,
        "max_connections": upstream.max_connections,
        "idle_timeout": upstream.idle_timeout,
        "tls": {"verify": upstream.tls.verify, "ca_file": upstream.tls.ca_file},
    }
    if upstream.userinfo is not None:
        tree["userinfo"] = REDACTED
    if upstream.quota is not None:
        tree["quota"] = asdict(upstream.quota)
    return tree


def _route_tree(route: Route, policy: str | None) -> dict[str, Any]:
    retry, breaker, fallback = route.retry, route.breaker, route.fallback
    return {
        "name": route.name,
        "match": {
            "path_prefix": route.match.path_prefix,
            "host": route.match.host,
            "methods": sorted(route.match.methods) if route.match.methods else None,
        },
        "upstream": route.upstream.name,
        "strip_prefix": route.strip_prefix,
        "policy": policy,
        "timeout": asdict(route.timeout),
        "retry": None
        if retry is None
        else {
            "max_attempts": retry.max_attempts,
            "backoff": asdict(retry.backoff),
            "on": list(retry.on.tokens),
            "methods": sorted(retry.methods),
            "idempotency_header": retry.idempotency_header,
            "retry_after": asdict(retry.retry_after),
            "budget": asdict(retry.budget),
            "max_body": retry.max_body,
        },
        "breaker": None
        if breaker is None
        else {
            "consecutive_failures": breaker.consecutive_failures,
            "failure_rate": asdict(breaker.failure_rate) if breaker.failure_rate else None,
            "slow_calls": asdict(breaker.slow_calls) if breaker.slow_calls else None,
            "failure_statuses": list(breaker.failure_statuses.tokens),
            "open_for": breaker.open_for,
            "open_for_max": breaker.open_for_max,
            "half_open_calls": breaker.half_open_calls,
            "half_open_max_wait": breaker.half_open_max_wait,
            "mode": breaker.mode,
            "share": breaker.share,
        },
        "bulkhead": asdict(route.bulkhead) if route.bulkhead else None,
        "rate_limit": None
        if route.rate_limit is None
        else {
            "rps": route.rate_limit.rps,
            "burst": route.rate_limit.burst,
            "per": "route"
            if route.rate_limit.per_header is None
            else "header:" + route.rate_limit.per_header,
            "shared": route.rate_limit.shared,
            "max_callers": route.rate_limit.max_callers,
        },
        "failover": None
        if route.failover is None
        else {
            "upstreams": [up.name for up in route.failover.upstreams],
            "on": list(route.failover.tokens),
        },
        "fallback": None
        if fallback is None
        else {
            "stale_if_error": fallback.stale_if_error,
            "methods": sorted(fallback.methods),
            "on": sorted(fallback.conditions) + list(fallback.statuses.tokens),
            "identity_headers": list(fallback.identity_headers),
            "store_set_cookie": fallback.store_set_cookie,
            "override_revalidate": fallback.override_revalidate,
            "static": None
            if fallback.static is None
            else {
                "status": fallback.static.status,
                "headers": dict(fallback.static.headers),
                "body": fallback.static.body.decode("utf-8", "replace"),
            },
        },
    }


def _postgres_tree(target: PostgresTarget) -> dict[str, Any]:
    return {
        "name": target.name,
        "dsn": target.display_dsn,
        "application_name": target.application_name,
        "agent_pool_size": target.agent_pool_size,
        "pool": {"min_size": target.pool_min_size, "max_size": target.pool_max_size},
        "probe": {
            "interval": target.probe_interval,
            "timeout": target.probe_timeout,
            "query": target.probe_query,
        },
        "degraded": {
            "latency": target.degraded_latency,
            "utilization": target.degraded_utilization,
            "consecutive_failures": target.degraded_consecutive_failures,
        },
        "critical": {
            "utilization": target.critical_utilization,
            "consecutive_failures": target.critical_consecutive_failures,
        },
        "readiness": target.readiness,
    }


class _Redactor:
    """Shows the effective config as loaded, values from `${VAR}` included (an operator
    confirms what a setting became), but hides credentials: `effective_tree` has already
    replaced injected header values, userinfo, DSN passwords and the token; here any value
    taken from a `${file:PATH}` (a mounted Secret), a URL or DSN with userinfo taken from
    `${VAR}` (whole), any other URL password, and, as a backstop, any string that contains
    a credential are replaced too."""

    def __init__(
        self, doc: Document, route_policies: list[str | None], credentials: frozenset[str]
    ) -> None:
        self.doc = doc
        self.route_policies = route_policies
        self.scrub = tuple(s for s in credentials if len(s) >= _MIN_SCRUB_LENGTH)

    def tree(self, node: dict[str, Any]) -> dict[str, Any]:
        return {key: self.node(value, (key,)) for key, value in node.items()}

    def node(self, value: Any, path: Path) -> Any:
        if isinstance(value, dict):
            return {key: self.node(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
            return [self.node(item, (*path, index)) for index, item in enumerate(value)]
        source = self.source(path)
        if any(p[: len(source)] == source for p in self.doc.file_vars):
            return REDACTED
        if isinstance(value, str) and _USERINFO.search(value) and self.doc.from_env(source):
            return REDACTED  # a DSN or URL with credentials from ${VAR}: hidden whole
        if isinstance(value, list):
            return [self.leaf(item) for item in value]
        return self.leaf(value)

    def leaf(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if any(secret in value for secret in self.scrub):
            return REDACTED
        return _URL_PASSWORD.sub(r"\1:" + REDACTED + "@", value) if "@" in value else value

    def source(self, path: Path) -> Path:
        """The raw path a value of the effective config was written at."""
        if len(path) > 2 and path[0] == "routes" and path[2] in STAGE_KEYS:
            index = path[1]
            assert isinstance(index, int)
            policy = self.route_policies[index] if index < len(self.route_policies) else None
            if policy and not self.doc.has(path):
                return ("policies", policy, *path[2:])
        return path

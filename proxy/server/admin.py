"""The admin listener (DESIGN §8): metrics, health, status, config, and the token-guarded API.

Mutations (`POST /breakers/...`, `POST /reload`, `DELETE /cache`) need
`Authorization: Bearer <token>`, compared in constant time: 401 without, 403 when wrong,
403 with a how-to message when no token is configured. On a non-loopback admin listener,
everything except /metrics, /healthz and /readyz needs the token too.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy import __version__
from proxy.cache import FallbackStore
from proxy.clock import Clock
from proxy.config.model import Config, Route
from proxy.errors import error_body
from proxy.observe import log
from proxy.observe.metrics import Metrics
from proxy.pgprobe import ProberSet
from proxy.resilience.bulkhead import Bulkhead
from proxy.server.runtime import Registry, Runtime
from proxy.state import StateBackend


class AdminContext(Protocol):
    """What the admin listener reads and drives: the process gives it these (the app
    object satisfies it), so this module does not depend on the app."""

    clock: Clock
    metrics: Metrics
    store: FallbackStore
    registry: Registry
    probers: ProberSet
    runtime: Runtime
    draining: bool
    started_at: float
    state: StateBackend  # the fleet state backend (DESIGN §15)

    @property
    def config(self) -> Config: ...

    async def reload(self, trigger: str) -> tuple[str, list[str]]: ...


APP_KEY: web.AppKey[AdminContext] = web.AppKey("proxy_app")
OPEN_PATHS = frozenset(("/metrics", "/healthz", "/readyz"))
BREAKER_ACTIONS = {
    "open": "forced_open",
    "close": "forced_closed",
    "disable": "disabled",
    "reset": "reset",
}
NO_TOKEN_HELP = (
    "admin mutations are disabled because no admin token is configured: set admin.token "
    "(e.g. token: ${RESILIENCE_PROXY_ADMIN_TOKEN}) or admin.token_file and reload"
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(data: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, indent=1, default=str).encode(),
        content_type=content_type,
    )


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=error_body("unauthorized", "", message), content_type="application/json"
    )


def check_token(request: web.Request, token: str | None) -> web.Response | None:
    """None when the request carries the configured token, else the refusal to send."""
    if not token:
        return _refuse(403, NO_TOKEN_HELP)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        response = _refuse(401, "this endpoint needs Authorization: Bearer <admin token>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="resilience-proxy"'
        return response
    # Raw bytes in the header arrive as surrogate escapes: compare bytes, never raise.
    offered = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(offered, token.encode("utf-8", "surrogateescape")):
        return _refuse(403, "the admin token is wrong")
    return None


# Reasons of the admin listener's own errors, by status (the JSON body of DESIGN §6).
ERROR_REASONS = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    500: "internal-error",
}


def _error(status: int, reason: str, message: str, route: str = "") -> web.Response:
    return web.Response(
        status=status, body=error_body(reason, route, message), content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every admin error is the proxy's JSON error body, never aiohttp's plain text."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = ERROR_REASONS.get(exc.status, "bad-request" if exc.status < 500 else "error")
        message = {
            404: "no such admin endpoint",
            405: f"use {exc.headers.get('Allow', '')} on {request.path}",
        }.get(exc.status, exc.reason.lower())
        error = _error(exc.status, reason, message)
        if "Allow" in exc.headers:
            error.headers["Allow"] = exc.headers["Allow"]
        return error
    except Exception as exc:  # noqa: BLE001 -- answer 500 as JSON and keep serving
        log.error("admin_error", path=request.path, error=type(exc).__name__)
        return _error(500, "internal-error", "the admin request failed; see the proxy log")
    return response


async def _drop_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No version banner (aiohttp adds `Server: Python/3.x aiohttp/x`)."""
    response.headers.popall("Server", None)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    app = request.app[APP_KEY]
    config = app.config
    mutating = request.method not in ("GET", "HEAD")
    remote_admin = not is_loopback(config.admin.host)
    if mutating or (remote_admin and request.path not in OPEN_PATHS):
        refusal = check_token(request, config.admin.token)
        if refusal is not None:
            return refusal
    response: web.StreamResponse = await handler(request)
    return response


async def metrics(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    app.metrics.sync_cache_evictions(app.store.evictions)
    accept = request.headers.get("Accept", "")
    if "application/openmetrics-text" in accept:
        body = generate_openmetrics(app.metrics.registry)  # type: ignore[no-untyped-call]
        content_type = OPENMETRICS_CONTENT_TYPE
    else:
        body = generate_latest(app.metrics.registry)
        content_type = CONTENT_TYPE_LATEST
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "pass"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    checks: dict[str, Any] = {}
    status = "pass"
    if app.draining:
        status = "fail"
        checks["shutdown"] = [{"status": "fail", "output": "draining: shutting down"}]
    pg_checks = app.probers.readiness_checks()
    if pg_checks:  # each check its own status: a critical target that is ignored is `warn`
        checks["postgres"] = [{"status": st, "output": note} for st, note in pg_checks]
    pg_statuses = {st for st, _ in pg_checks}
    if "fail" in pg_statuses:
        status = "fail"
    elif pg_statuses and status == "pass":
        status = "warn"
    state = app.state
    if not state.available:  # limits still hold locally: degraded, never failing
        output = f"{state.name} state backend unavailable: shared limits enforced locally"
        checks["state"] = [{"status": "warn", "output": output}]
        if status == "pass":
            status = "warn"
    body = {
        "status": status,
        "version": __version__,
        "releaseId": app.config.hash[:12],
        "checks": checks,
    }
    return _json(body, 503 if status == "fail" else 200, "application/health+json")


def status_document(app: AdminContext) -> dict[str, Any]:
    runtime = app.runtime
    config = runtime.config
    now = app.clock.now()
    store_stats = app.store.stats()
    per_route_cache = cast(dict[str, Any], store_stats.get("per_route") or {})
    wall = app.clock.wall()
    metrics = app.metrics
    failures = app.registry.failures
    routes = []
    for rt in runtime.routes:
        route = rt.route
        state = rt.state
        recent = rt.metrics.recent
        breaker_state = state.breaker.reported_state().value if state.breaker else None
        last = failures.last(rt.name, route.upstream.name)
        history = rt.metrics.history.snapshot(now, wall, breaker_state)
        bulkhead = _bulkhead_status(route, state.bulkhead)
        entry: dict[str, Any] = {}
        if rt.failover:
            # Each target's own breaker and bulkhead, in order, and which one answered last.
            entry["serving"] = state.serving.upstream
            entry["targets"] = [
                {
                    "upstream": target.upstream.name,
                    "primary": index == 0,
                    "serving": target.upstream.name == state.serving.upstream,
                    "breaker": target.breaker.snapshot() if target.breaker is not None else None,
                    "bulkhead": _bulkhead_status(route, target.bulkhead),
                }
                for index, target in enumerate(state.targets)
            ]
        routes.append(
            {
                "name": rt.name,
                "upstream": route.upstream.name,
                "match": {
                    "path_prefix": route.match.path_prefix,
                    "host": route.match.host,
                    "methods": sorted(route.match.methods) if route.match.methods else None,
                },
                "stages": list(rt.stages),
                "breaker": state.breaker.snapshot() if state.breaker is not None else None,
                "bulkhead": bulkhead,
                "last_minute": {name: c.total(now) for name, c in recent.items()},
                "cache": per_route_cache.get(rt.name, {"entries": 0, "bytes": 0}),
                **entry,
                "outcomes": metrics.outcomes(rt.name),  # since start
                "totals": metrics.totals(rt.name),  # retries and fallbacks since start
                "latency_ms": history.pop("latency_ms"),  # p50/p99 over the last 15 minutes
                "last_failure": (
                    {"outcome": last.outcome, "cause": last.cause, "at": _iso(last.at)}
                    if last is not None
                    else None
                ),
                "history": history,
                "quota": None,  # filled by the quota tracking (DESIGN §14) where known
            }
        )
    upstreams = []
    quotas = dict(app.registry.iter_quotas())
    for name, upstream in config.upstreams.items():
        client = app.registry.clients.get(name)
        quota: dict[str, Any] | None = None
        summary = quotas.get(name)
        if summary is not None and upstream.quota is not None:
            quota = {"headers": upstream.quota.headers, "reserve": upstream.quota.reserve}
            quota.update(summary)
        upstreams.append(
            {
                "name": name,
                "url": upstream.url,
                "max_connections": upstream.max_connections,
                "in_flight": client.in_flight if client is not None else 0,
                "quota": quota,
            }
        )
    return {
        "version": __version__,
        "config": {
            "hash": config.hash,
            "source": config.source,
            "loaded_at": _iso(runtime.loaded_at),
        },
        "started_at": _iso(app.started_at),
        "draining": app.draining,
        "routes": routes,
        "upstreams": upstreams,
        "cache": {k: v for k, v in store_stats.items() if k != "per_route"},
        "postgres": app.probers.snapshots(),
        "state": app.state.snapshot(),
    }


def _bulkhead_status(route: Route, bulkhead: Bulkhead | None) -> dict[str, int] | None:
    if bulkhead is None or route.bulkhead is None:
        return None
    return {
        "max_concurrent": route.bulkhead.max_concurrent,
        "max_queued": route.bulkhead.max_queued,
        "in_flight": bulkhead.in_flight,
        "queued": bulkhead.queued,
    }


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")


async def status(request: web.Request) -> web.Response:
    return _json(status_document(request.app[APP_KEY]))


async def config_view(request: web.Request) -> web.Response:
    return _json(request.app[APP_KEY].config.redacted)


async def status_page(request: web.Request) -> web.Response:
    html = resources.files("proxy.server").joinpath("statuspage.html").read_text("utf-8")
    response = web.Response(text=html, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:"
    )
    return response


async def breaker_action(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    route_name = request.match_info["route"]
    action = request.match_info["action"]
    if action not in BREAKER_ACTIONS:
        actions = ", ".join(BREAKER_ACTIONS)
        return _error(404, "not-found", f"unknown breaker action; use {actions}", route_name)
    # `?upstream=NAME`: one target of a failover route (e.g. force the primary open to move
    # its traffic to the next target); without it, every target's breaker of the route.
    upstream = request.query.get("upstream")
    found = [
        (key, b)
        for key, b in app.registry.breakers.items()
        if key[0] == route_name and (upstream is None or key[1] == upstream)
    ]
    if not found:
        message = "no route with a circuit breaker has this name"
        if upstream is not None:
            message = "no route with a circuit breaker has this name and upstream"
        return _json(
            {"error": {"reason": "not-found", "route": route_name, "message": message}}, 404
        )
    for _, breaker in found:
        if action == "reset":
            breaker.reset()
        else:
            breaker.force(BREAKER_ACTIONS[action])
    breakers = [{"upstream": key[1], **b.snapshot()} for key, b in found]
    return _json({"route": route_name, "breakers": breakers})


async def reload_config(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    result, problems = await app.reload("admin")
    status_code = 200 if result != "error" else 422
    return _json({"result": result, "problems": problems, "hash": app.config.hash}, status_code)


async def clear_cache(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    route = request.query.get("route")
    removed = app.store.clear(route)
    return _json({"removed": removed, "route": route})


def build_admin_app(app: AdminContext) -> web.Application:
    admin = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=64 * 1024
    )
    admin.on_response_prepare.append(_drop_server_header)
    admin[APP_KEY] = app
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/status", status)
    admin.router.add_get("/config", config_view)
    admin.router.add_get("/", status_page)
    admin.router.add_post("/breakers/{route}/{action}", breaker_action)
    admin.router.add_post("/reload", reload_config)
    admin.router.add_delete("/cache", clear_cache)
    return admin

"""The PostgreSQL pool-health prober (DESIGN §7): one asyncpg pool and one probe loop per
target, graded by `health.HealthTracker`.

Each probe acquires a connection from the prober's own small pool and runs the target's
`probe_query`, each step bounded by `probe_timeout`; then, on the same connection, it reads
`pg_stat_activity` for the agent's connections (matched by `application_name`, the
prober's own backends excluded) and `max_connections`. The pool is created lazily,
discarded after a failure (terminated if a graceful close does not finish in time) and
created again by the next probe, so every failure mode (server down, restarting, refusing,
blackholed, slow, bad credentials, unresolvable host) ends as a graded status within
`probe_timeout` plus a small margin, and recovers by itself.

Results leave as `PgProbed` / `PgStatusChanged` events and as `snapshots()` (JSON-able
dicts read by /status, /readyz and the metrics collector at scrape time).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.clock import Clock
from proxy.config.model import PostgresTarget
from proxy.observe.events import Event, PgProbed, PgStatusChanged
from proxy.pgprobe.health import RECOVERY_PROBES, Grade, HealthTracker, Thresholds

PROBE_APPLICATION_NAME: Final = "resilience-proxy-probe"
"""The `application_name` of the prober's own connections, so they are never counted as
the agent's and operators can tell them apart in pg_stat_activity."""

CLOSE_TIMEOUT_CAP: Final = 5.0
"""Longest wait (seconds) for a graceful pool close before terminating it; the effective
bound is min(probe_timeout, this)."""

MAX_ERROR_CHARS: Final = 300
"""`last_error` is cut to this many characters: server messages can be long."""

# Failure reasons, the `reason` label of pg_probe_failures_total.
REASON_TIMEOUT: Final = "timeout"
REASON_CONNECT: Final = "connect"
REASON_AUTH: Final = "auth"
REASON_QUERY: Final = "query"
REASON_OTHER: Final = "other"

# One round trip: the agent's connections by state, plus what utilization needs. Agent rows
# are those with the agent's application_name, minus this backend and the prober's other
# backends ($2). Without pg_read_all_stats (pg_monitor), other roles' rows are visible but
# with state, wait_event_type and xact_start NULL: `hidden` counts those.
STATS_SQL: Final = """
WITH a AS (
    SELECT s.*,
           s.application_name = $1
             AND s.pid <> pg_backend_pid()
             AND NOT (s.pid = ANY($2::int[])) AS agent
    FROM pg_stat_activity s
    WHERE s.backend_type IS NULL OR s.backend_type = 'client backend'
)
SELECT
    count(*) FILTER (WHERE agent) AS total,
    count(*) FILTER (WHERE agent AND state = 'active') AS active,
    count(*) FILTER (WHERE agent AND state = 'idle') AS idle,
    count(*) FILTER (WHERE agent AND state LIKE 'idle in transaction%')
        AS idle_in_transaction,
    count(*) FILTER (WHERE agent AND wait_event_type = 'Lock') AS waiting,
    count(*) FILTER (WHERE agent AND state IS NULL) AS hidden,
    coalesce(extract(epoch FROM max(now() - xact_start) FILTER (WHERE agent)), 0)::float8
        AS longest_transaction_seconds,
    count(*) AS all_connections,
    current_setting('max_connections')::int AS max_connections,
    pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS privileged
FROM a
"""


@dataclass(frozen=True, slots=True)
class ServerStats:
    """What the server says about the agent's connections (counts of backends)."""

    total: int
    active: int
    idle: int
    idle_in_transaction: int
    waiting: int
    longest_transaction_seconds: float
    all_connections: int  # every client backend, the prober's included
    max_connections: int
    partial: bool  # some agent rows were hidden from the prober's role (no pg_monitor)

    def utilization(self, agent_pool_size: int | None) -> float:
        """total / agent_pool_size when that is set, else all_connections /
        max_connections; clamped to 0..1 (replicas sharing a name can exceed the size)."""
        if agent_pool_size:
            ratio = self.total / agent_pool_size
        elif self.max_connections > 0:
            ratio = self.all_connections / self.max_connections
        else:
            ratio = 0.0
        return min(1.0, max(0.0, ratio))


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """A probe that failed: the reason label and a printable, password-free error."""

    reason: str
    error: str


def dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The strings that must never appear in output: the DSN itself and its password
    (raw and percent-decoded, from the userinfo or a `password=` query parameter)."""
    found: set[str] = {dsn}
    with contextlib.suppress(ValueError):
        parts = urlsplit(dsn)
        raw_password = parts.netloc.rpartition("@")[0].partition(":")[2]
        if raw_password:
            found.update({raw_password, unquote(raw_password)})
        for key, value in parse_qsl(parts.query, keep_blank_values=False):
            if key == "password" and value:
                found.add(value)
    for match in re.finditer(r"password=([^&\s]+)", dsn):
        found.update({match.group(1), unquote(match.group(1))})
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by `<redacted>`, longest first."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "<redacted>")
    return text


def _asyncpg() -> Any:
    """asyncpg, imported on first use: it adds about 4 MB to the RSS of every sidecar, and
    most configure no `postgres` check."""
    import asyncpg

    return asyncpg


@cache
def _connection_errors() -> tuple[type[BaseException], ...]:
    """The server went away or refused the session, whatever step was running."""
    pg = _asyncpg()
    return (
        OSError,
        pg.PostgresConnectionError,
        pg.AdminShutdownError,
        pg.CrashShutdownError,
        pg.CannotConnectNowError,
        pg.exceptions.DatabaseDroppedError,
        pg.exceptions.IdleSessionTimeoutError,
        pg.TooManyConnectionsError,
    )


def classify(exc: BaseException, *, connecting: bool) -> str:
    """The failure reason of an exception: timeout | connect | auth | query | other.

    While connecting, a server error other than authentication (database starting or
    shutting down, too many connections, unknown database) is a connect failure; once
    connected, server errors are query failures unless the connection itself broke.
    """
    if isinstance(exc, TimeoutError):
        return REASON_TIMEOUT
    pg = _asyncpg()
    if isinstance(exc, pg.InvalidAuthorizationSpecificationError):
        return REASON_AUTH
    if isinstance(exc, _connection_errors()):
        return REASON_CONNECT
    if isinstance(exc, pg.PostgresError):
        return REASON_CONNECT if connecting else REASON_QUERY
    if connecting and isinstance(exc, pg.InterfaceError | ConnectionError | EOFError):
        return REASON_CONNECT
    return REASON_OTHER


def _describe(exc: BaseException, secrets: Sequence[str]) -> str:
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    text = scrub(text, secrets)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=UTC).isoformat(timespec="milliseconds")


def _pool_key(t: PostgresTarget) -> tuple[object, ...]:
    """The settings baked into an asyncpg pool: a change means a new pool."""
    return (t.dsn, t.pool_min_size, t.pool_max_size, t.probe_timeout)


class Prober:
    """Probes one target forever (until `stop`), one probe at a time.

    The loop runs a probe at start and then every `probe_interval` seconds measured from
    the start of the previous probe (a probe longer than the interval delays the next one,
    never overlaps it). Time is read from the injected `Clock`; only the per-step
    timeouts use the event loop's timer.
    """

    def __init__(self, target: PostgresTarget, clock: Clock, emit: Callable[[Event], None]) -> None:
        self._target = target
        self._clock = clock
        self._emit = emit
        self._secrets = dsn_secrets(target.dsn)
        self._health = HealthTracker()
        self._pool: Any = None  # asyncpg.Pool, created lazily
        self._own_pids: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._up = False
        self._last_check: float | None = None  # wall seconds
        self._last_duration: float | None = None  # seconds
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_reason = ""
        self._stats: ServerStats | None = None
        self._stats_error: str | None = None
        self._interval_used = target.probe_interval  # the interval the schedule runs on

    @property
    def target(self) -> PostgresTarget:
        return self._target

    @property
    def grade(self) -> Grade:
        """The reported status with its reason."""
        return self._health.current

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"pgprobe:{self._target.name}"
            )

    async def stop(self) -> None:
        """Cancel the loop (a probe in flight included) and close the pool."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieve it, so asyncio does not report it at collection
        await self._discard_pool()

    async def update(self, target: PostgresTarget) -> None:
        """Adopt a reloaded target: thresholds apply from the next probe; a new interval
        reschedules the next probe; a new DSN, pool size or timeout replaces the pool and
        probes at once. The status history is kept."""
        old, self._target = self._target, target
        if target == old:
            return
        self._secrets = dsn_secrets(target.dsn)
        if _pool_key(target) != _pool_key(old):
            running = self._task is not None
            await self.stop()
            if running:
                self.start()
        elif target.probe_interval != old.probe_interval:
            self._wake.set()

    # -- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        next_due = self._clock.now()
        while True:
            delay = next_due - self._clock.now()
            if delay > 0:
                self._wake.clear()
                if await self._sleep_or_wake(delay):
                    # The interval changed: reschedule from the previous probe's start.
                    next_due = next_due - self._interval_used + self._target.probe_interval
                    self._interval_used = self._target.probe_interval
                    continue
            started = self._clock.now()
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                # Python 3.11's asyncio.timeout can leave a stray cancellation behind
                # when its deadline fires just as the awaited step completes; only a
                # cancellation someone requested (stop) may end the loop.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
            self._interval_used = self._target.probe_interval
            next_due = started + self._interval_used

    async def _sleep_or_wake(self, delay: float) -> bool:
        """Sleep `delay` seconds on the Clock; True if woken early by `update`."""
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                fut.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
        return waker.done() and not waker.cancelled()

    # -- one probe -------------------------------------------------------------------

    async def probe_once(self) -> None:
        """Run one probe, record it, emit `PgProbed` (and `PgStatusChanged` on a change).

        Never raises but `CancelledError`."""
        t = self._target
        started = self._clock.now()
        failure: ProbeFailure | None = None
        try:
            result = await self._probe(t, started)
        except _Failed as failed:
            failure = failed.failure
            result = _Measured(duration=self._clock.now() - started)
        self._record(t, failure, result)
        if failure is not None and failure.reason != REASON_QUERY:
            # The connection or the pool may be in any state: start afresh next time.
            await self._discard_pool()

    async def _probe(self, t: PostgresTarget, started: float) -> _Measured:
        timeout = t.probe_timeout
        setup = 0.0  # seconds spent creating the pool, when this probe had to
        try:
            async with asyncio.timeout(timeout):
                pool = self._pool
                if pool is None:
                    pool = await self._create_pool(t)
                    setup = self._clock.now() - started
                con = await pool.acquire()
        except Exception as exc:
            raise _Failed(self._failure(exc, connecting=True, step="connect", t=t)) from exc
        try:
            try:
                async with asyncio.timeout(timeout):
                    await con.execute(t.probe_query)
            except Exception as exc:
                raise _Failed(
                    self._failure(exc, connecting=False, step="query", t=t, con=con)
                ) from exc
            duration = self._clock.now() - started
            latency = duration - setup
            try:
                async with asyncio.timeout(timeout):
                    row = await con.fetchrow(STATS_SQL, t.application_name, sorted(self._own_pids))
            except Exception as exc:
                failure = self._failure(exc, connecting=False, step="query", t=t, con=con)
                if failure.reason == REASON_QUERY:
                    # The probe query worked; only the statistics are unavailable (an
                    # unusual server or a proxy in front of it): report, do not fail.
                    return _Measured(duration, latency, None, failure.error)
                raise _Failed(failure) from exc
            return _Measured(duration, latency, _stats_from_row(row))
        finally:
            await self._release(pool, con, timeout)

    def _failure(
        self,
        exc: BaseException,
        *,
        connecting: bool,
        step: str,
        t: PostgresTarget,
        con: Any = None,
    ) -> ProbeFailure:
        reason = classify(exc, connecting=connecting)
        if reason in (REASON_QUERY, REASON_OTHER) and con is not None and con.is_closed():
            # Whatever asyncpg raised, the server or the network dropped the session.
            reason = REASON_CONNECT
        if reason == REASON_TIMEOUT:
            what = "no connection" if step == "connect" else "query not finished"
            error = f"TimeoutError: {what} within {t.probe_timeout:g}s"
        else:
            error = _describe(exc, self._secrets)
        return ProbeFailure(reason, error)

    def _record(
        self,
        t: PostgresTarget,
        failure: ProbeFailure | None,
        result: _Measured,
    ) -> None:
        ok = failure is None
        duration, stats = result.duration, result.stats
        self._up = ok
        self._last_check = self._clock.wall()
        self._last_duration = duration
        self._stats = stats
        self._stats_error = result.stats_error
        utilization = stats.utilization(t.agent_pool_size) if stats is not None else None
        if failure is not None:
            self._last_error = failure.error
            self._last_error_at = self._last_check
            self._last_reason = failure.reason
        else:
            self._last_reason = ""
        change = self._health.record(
            Thresholds.from_target(t), ok=ok, latency=result.latency, utilization=utilization
        )
        self._publish(PgProbed(t.name, ok, duration, "" if ok else self._last_reason))
        if change is not None:
            self._publish(
                PgStatusChanged(t.name, change.from_status, change.to_status, change.reason)
            )

    def _publish(self, event: Event) -> None:
        try:
            self._emit(event)
        except Exception:  # noqa: BLE001 - an observer's bug must not stop the probing
            pass

    # -- the pool --------------------------------------------------------------------

    async def _create_pool(self, t: PostgresTarget) -> Any:
        self._own_pids.clear()
        pool = _asyncpg().create_pool(
            dsn=t.dsn,
            min_size=min(t.pool_min_size, t.pool_max_size),
            max_size=t.pool_max_size,
            timeout=t.probe_timeout,  # connect timeout of each new connection
            command_timeout=t.probe_timeout,  # also bounds asyncpg's cancel requests
            server_settings={"application_name": PROBE_APPLICATION_NAME},
            init=self._on_connect,
        )
        await pool  # connects min_size; on failure asyncpg closes what it opened
        self._pool = pool
        return pool

    async def _on_connect(self, con: Any) -> None:
        pid = con.get_server_pid()
        self._own_pids.add(pid)
        con.add_termination_listener(lambda _con: self._own_pids.discard(pid))

    async def _release(self, pool: Any, con: Any, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await pool.release(con)
        except Exception:  # noqa: BLE001 - asyncpg terminates a connection it cannot reset
            con.terminate()

    async def _discard_pool(self) -> None:
        """Close the pool gracefully within a short bound, else terminate it."""
        pool, self._pool = self._pool, None
        self._own_pids.clear()
        if pool is None:
            return
        try:
            async with asyncio.timeout(min(self._target.probe_timeout, CLOSE_TIMEOUT_CAP)):
                await pool.close()
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except Exception:  # noqa: BLE001 - a pool that cannot close politely is terminated
            pool.terminate()

    # -- reporting -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The target's state as /status shows it; numbers are null when not known."""
        t = self._target
        current = self._health.current
        stats = self._stats
        status = current.status
        detail = current.detail
        if self._health.recovering:
            good = self._health.recovering
            detail = f"{detail}; recovering ({good} of {RECOVERY_PROBES} better probes)"
        pool = self._pool
        size, idle = (pool.get_size(), pool.get_idle_size()) if pool is not None else (0, 0)
        prober_pool = {"size": size, "max_size": t.pool_max_size, "used": size - idle, "idle": idle}
        server: dict[str, Any] = {
            "total": stats.total if stats else None,
            "active": stats.active if stats else None,
            "idle": stats.idle if stats else None,
            "idle_in_transaction": stats.idle_in_transaction if stats else None,
            "waiting": stats.waiting if stats else None,
            "longest_transaction_seconds": (
                round(stats.longest_transaction_seconds, 3) if stats else None
            ),
            "all_connections": stats.all_connections if stats else None,
            "max_connections": stats.max_connections if stats else None,
            "partial": stats.partial if stats else False,
            "error": self._stats_error,
        }
        return {
            "name": t.name,
            "dsn": t.display_dsn,
            "application_name": t.application_name,
            "status": status,
            "reason": current.reason,
            "detail": detail,
            "healthy": status in ("ok", "degraded"),
            "up": self._up,
            "readiness": t.readiness,
            "pool_size": stats.total if stats else 0,
            "pool_used": stats.active + stats.idle_in_transaction if stats else 0,
            "pool_idle": stats.idle if stats else 0,
            "check_duration_ms": (
                round(self._last_duration * 1000, 1) if self._last_duration is not None else None
            ),
            "consecutive_failures": self._health.consecutive_failures,
            "last_failure_reason": self._last_reason or None,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at) if self._last_error_at else None,
            "last_check": _iso(self._last_check) if self._last_check is not None else None,
            "utilization": (
                round(stats.utilization(t.agent_pool_size), 4) if stats is not None else None
            ),
            "agent_pool_size": t.agent_pool_size,
            "probe_interval": t.probe_interval,
            "probe_timeout": t.probe_timeout,
            "server": server,
            "prober_pool": prober_pool,
        }


@dataclass(frozen=True, slots=True)
class _Measured:
    """One probe's measurements (seconds). `duration` is acquire + query as reported;
    `latency`, which is graded, leaves out creating the pool: a cold connect (TLS,
    authentication) after a start or a failure is not the database being slow."""

    duration: float
    latency: float | None = None
    stats: ServerStats | None = None
    stats_error: str | None = None


class _Failed(Exception):
    """Internal: carries a classified failure out of `_probe`."""

    def __init__(self, failure: ProbeFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def _stats_from_row(row: Any) -> ServerStats:
    return ServerStats(
        total=int(row["total"]),
        active=int(row["active"]),
        idle=int(row["idle"]),
        idle_in_transaction=int(row["idle_in_transaction"]),
        waiting=int(row["waiting"]),
        longest_transaction_seconds=float(row["longest_transaction_seconds"]),
        all_connections=int(row["all_connections"]),
        max_connections=int(row["max_connections"]),
        partial=not row["privileged"] and int(row["hidden"]) > 0,
    )


class ProberSet:
    """One `Prober` per configured target; `apply` reconciles them with a (re)loaded
    config."""

    def __init__(self, clock: Clock, emit: Callable[[Event], None]) -> None:
        self._clock = clock
        self._emit = emit
        self._probers: dict[str, Prober] = {}
        self._lock = asyncio.Lock()  # reloads arriving together apply one after the other

    async def apply(self, targets: Sequence[PostgresTarget]) -> None:
        """Start new targets, update changed ones, stop removed ones (closing their
        pools). Order of `snapshots()` follows `targets`."""
        async with self._lock:
            wanted = {t.name: t for t in targets}
            removed = [p for name, p in self._probers.items() if name not in wanted]
            if removed:
                await asyncio.gather(*(p.stop() for p in removed))
            updated: dict[str, Prober] = {}
            for name, target in wanted.items():
                prober = self._probers.get(name)
                if prober is None:
                    prober = Prober(target, self._clock, self._emit)
                    prober.start()
                else:
                    await prober.update(target)
                updated[name] = prober
            self._probers = updated

    async def close(self) -> None:
        """Stop every loop and close every pool."""
        async with self._lock:
            probers, self._probers = list(self._probers.values()), {}
            await asyncio.gather(*(p.stop() for p in probers))

    def get(self, name: str) -> Prober | None:
        return self._probers.get(name)

    def snapshots(self) -> list[dict[str, Any]]:
        return [p.snapshot() for p in self._probers.values()]

    def readiness(self) -> tuple[str, list[str]]:
        """("pass" | "warn" | "fail", notes): warn while any target is degraded or
        critical, fail when a `fail_on_critical` target is critical; unknown passes."""
        checks = self.readiness_checks()
        statuses = {status for status, _ in checks}
        result = "fail" if "fail" in statuses else "warn" if statuses else "pass"
        return result, [note for _, note in checks]

    def readiness_checks(self) -> list[tuple[str, str]]:
        """One (status, note) per target that is not ok: `fail` only for a critical target
        with `readiness: fail_on_critical`, else `warn` (degraded, or critical and ignored)."""
        checks: list[tuple[str, str]] = []
        for prober in self._probers.values():
            grade = prober.grade
            if grade.status not in ("degraded", "critical"):
                continue
            note = f"postgres {prober.target.name}: {grade.status} ({grade.reason})"
            failing = grade.status == "critical" and prober.target.readiness == "fail_on_critical"
            checks.append(("fail" if failing else "warn", note))
        return checks

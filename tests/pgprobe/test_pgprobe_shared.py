"""Happy paths against the machine's shared PostgreSQL, read-only: the prober's report of a
healthy server, and the agent's connections (made here with the agent's application_name)
counted and graded. Each test uses its own random application_name, so other users of
the server do not show up in the counts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import asyncpg
import pytest

from proxy.clock import FakeClock, SystemClock
from proxy.config.model import PostgresTarget
from proxy.observe.events import PgProbed, PgStatusChanged
from proxy.pgprobe import PROBE_APPLICATION_NAME, ProberSet
from tests.pgprobe.conftest import Recorder, make_target, other_tasks, wait_until


def _snap(probers: ProberSet) -> dict[str, object]:
    (snap,) = probers.snapshots()
    return snap


@pytest.fixture
async def agent_connections(shared_dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    cons: list[asyncpg.Connection] = []
    yield cons
    for con in cons:
        con.terminate()


async def _connect_as_agent(dsn: str, target: PostgresTarget) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn, server_settings={"application_name": target.application_name}, timeout=5
    )


async def test_a_healthy_target_reports_ok_with_every_field(shared_dsn: str) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target(shared_dsn, agent_pool_size=None)
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="status ok")
        snap = _snap(probers)
        max_connections = await _show_max_connections(shared_dsn)
    finally:
        await probers.close()

    assert snap["name"] == "main"
    assert snap["dsn"] == target.display_dsn
    assert snap["healthy"] is True and snap["up"] is True
    assert snap["reason"] == "ok"
    assert snap["consecutive_failures"] == 0
    assert snap["last_error"] is None
    assert isinstance(snap["check_duration_ms"], float) and snap["check_duration_ms"] > 0
    assert isinstance(snap["last_check"], str)
    assert datetime.fromisoformat(snap["last_check"]).tzinfo is not None
    # No agent connection exists under this test's application_name.
    assert (snap["pool_size"], snap["pool_used"], snap["pool_idle"]) == (0, 0, 0)
    server = snap["server"]
    assert isinstance(server, dict)
    assert server["total"] == 0
    assert server["max_connections"] == max_connections
    assert server["partial"] is False  # postgres is a superuser
    # Without agent_pool_size: all client connections over max_connections, and the
    # prober's own connection is one of them.
    assert server["all_connections"] >= 1
    assert snap["utilization"] == pytest.approx(
        server["all_connections"] / max_connections, abs=1e-3
    )
    pool = snap["prober_pool"]
    assert isinstance(pool, dict)
    assert pool["max_size"] == target.pool_max_size
    json.dumps(snap)  # JSON-able as /status serves it

    probes = events.probes()
    assert probes and all(p.ok and p.reason == "" and p.duration > 0 for p in probes)
    assert events.changes()[0] == PgStatusChanged("main", "unknown", "ok", "ok")
    assert probers.readiness() == ("pass", [])
    assert probers.snapshots() == []


async def _show_max_connections(dsn: str) -> int:
    con = await asyncpg.connect(dsn, timeout=5)
    try:
        return int(await con.fetchval("SHOW max_connections"))
    finally:
        await con.close()


async def test_agent_connections_are_counted_by_state(
    shared_dsn: str, agent_connections: list[asyncpg.Connection]
) -> None:
    target = make_target(shared_dsn, agent_pool_size=10)
    idle = await _connect_as_agent(shared_dsn, target)
    in_tx = await _connect_as_agent(shared_dsn, target)
    busy = await _connect_as_agent(shared_dsn, target)
    agent_connections.extend([idle, in_tx, busy])
    await in_tx.execute("BEGIN; SELECT 1")
    sleeper = asyncio.ensure_future(busy.execute("SELECT pg_sleep(30)"))

    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([target])
    try:
        await wait_until(
            lambda: _snap(probers)["server"]["active"] == 1,  # type: ignore[index]
            what="the sleeping connection seen active",
        )
        await asyncio.sleep(0.05)  # let the open transaction age a little
        await wait_until(
            lambda: _snap(probers)["server"]["longest_transaction_seconds"] > 0,  # type: ignore[index]
            what="a transaction age",
        )
        snap = _snap(probers)
    finally:
        sleeper.cancel()
        await probers.close()

    server = snap["server"]
    assert isinstance(server, dict)
    assert (server["total"], server["active"], server["idle"]) == (3, 1, 1)
    assert server["idle_in_transaction"] == 1
    assert server["waiting"] == 0
    # The legacy monitor's fields: used = active + idle in transaction.
    assert (snap["pool_size"], snap["pool_used"], snap["pool_idle"]) == (3, 2, 1)
    assert snap["utilization"] == pytest.approx(0.3)
    assert snap["status"] == "ok"


async def test_a_connection_waiting_on_a_lock_is_counted(
    shared_dsn: str, agent_connections: list[asyncpg.Connection]
) -> None:
    target = make_target(shared_dsn)
    holder = await _connect_as_agent(shared_dsn, target)
    waiter = await _connect_as_agent(shared_dsn, target)
    agent_connections.extend([holder, waiter])
    key = 0x5EED_0000 + id(target) % 10_000  # an advisory lock: nothing is modified
    await holder.execute(f"SELECT pg_advisory_lock({key})")
    blocked = asyncio.ensure_future(waiter.execute(f"SELECT pg_advisory_lock({key})"))
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([target])
    try:
        await wait_until(
            lambda: _snap(probers)["server"]["waiting"] == 1,  # type: ignore[index]
            what="one waiter",
        )
    finally:
        blocked.cancel()
        await probers.close()


async def test_utilization_of_the_agent_pool_drives_degraded_then_critical(
    shared_dsn: str, agent_connections: list[asyncpg.Connection]
) -> None:
    events = Recorder()
    target = make_target(
        shared_dsn, agent_pool_size=4, degraded_utilization=0.5, critical_utilization=0.95
    )
    probers = ProberSet(SystemClock(), events)
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        for _ in range(2):
            agent_connections.append(await _connect_as_agent(shared_dsn, target))
        await wait_until(lambda: _snap(probers)["status"] == "degraded", what="degraded")
        assert _snap(probers)["reason"] == "utilization"
        assert _snap(probers)["utilization"] == pytest.approx(0.5)
        assert probers.readiness()[0] == "warn"

        for _ in range(2):
            agent_connections.append(await _connect_as_agent(shared_dsn, target))
        await wait_until(lambda: _snap(probers)["status"] == "critical", what="critical")
        snap = _snap(probers)
        assert snap["utilization"] == pytest.approx(1.0)
        assert snap["healthy"] is False
        # readiness: ignore → warn, not fail.
        status, notes = probers.readiness()
        assert status == "warn"
        assert notes == ["postgres main: critical (utilization)"]

        for con in agent_connections:
            await con.close()
        agent_connections.clear()
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="back to ok")
    finally:
        await probers.close()

    statuses = [(c.from_status, c.to_status, c.reason) for c in events.changes()]
    assert statuses == [
        ("unknown", "ok", "ok"),
        ("ok", "degraded", "utilization"),
        ("degraded", "critical", "utilization"),
        ("critical", "ok", "recovered"),
    ]
    # Stepping down took at least two probes after the step up (each probe's PgProbed
    # precedes the PgStatusChanged it causes).
    probes_after = _probes_between(events, "critical", "ok")
    assert probes_after >= 2


def _probes_between(events: Recorder, from_status: str, to_status: str) -> int:
    """How many probes ran between the last change into `from_status` and the change
    from it to `to_status`."""
    count = None
    for event in events.events:
        if isinstance(event, PgStatusChanged) and event.to_status == from_status:
            count = 0
        elif isinstance(event, PgProbed) and count is not None:
            count += 1
        elif isinstance(event, PgStatusChanged) and event.from_status == from_status:
            assert event.to_status == to_status
            return count or 0
    raise AssertionError("no such change")


async def test_probes_follow_the_injected_clock(shared_dsn: str) -> None:
    """First probe at start, then one per interval of (fake) time, never overlapping; a
    reloaded interval reschedules the pending probe."""
    clock = FakeClock()
    events = Recorder()
    probers = ProberSet(clock, events)
    target = make_target(shared_dsn, probe_interval=60.0)
    await probers.apply([target])
    try:
        await wait_until(lambda: len(events.probes()) == 1, what="the first probe")
        await asyncio.sleep(0.2)
        assert len(events.probes()) == 1  # nothing more until the clock moves
        clock.advance(59.0)
        await asyncio.sleep(0.2)
        assert len(events.probes()) == 1
        clock.advance(1.0)
        await wait_until(lambda: len(events.probes()) == 2, what="the second probe")

        # Reload with a shorter interval: due 10s after the previous probe's start.
        await probers.apply([replace(target, probe_interval=10.0)])
        await asyncio.sleep(0.1)
        assert len(events.probes()) == 2
        clock.advance(10.0)
        await wait_until(lambda: len(events.probes()) == 3, what="the rescheduled probe")
    finally:
        await probers.close()
    assert other_tasks() == []


async def test_the_probers_own_connections_are_named_and_released_on_close(
    shared_dsn: str,
) -> None:
    target = make_target(shared_dsn, pool_min_size=2, pool_max_size=2)
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        snap = _snap(probers)
        assert snap["prober_pool"] == {"size": 2, "max_size": 2, "used": 0, "idle": 2}
    finally:
        await probers.close()
    assert other_tasks() == []
    assert PROBE_APPLICATION_NAME == "resilience-proxy-probe"

"""Failure modes against a throwaway cluster of our own (see conftest): stopped and
restarted, blackholed or slow behind a relay, slow queries, bad credentials, an
unresolvable host, missing pg_monitor, and pools closed when a target goes away."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import asyncpg

from proxy.clock import SystemClock
from proxy.observe.events import PgStatusChanged
from proxy.pgprobe import PROBE_APPLICATION_NAME, ProberSet
from tests.pgprobe.conftest import (
    APP_PASSWORD,
    Cluster,
    Recorder,
    RelayFactory,
    make_target,
    other_tasks,
    wait_until,
    wait_until_async,
)


def _snap(probers: ProberSet) -> dict[str, object]:
    (snap,) = probers.snapshots()
    return snap


async def _prober_backends(cluster: Cluster) -> int:
    return int(
        await cluster.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            PROBE_APPLICATION_NAME,
        )
    )


async def test_a_stopped_server_turns_critical_and_recovers_after_two_good_probes(
    cluster: Cluster,
) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target(
        cluster.dsn(),
        probe_interval=0.2,
        probe_timeout=1.0,
        critical_consecutive_failures=3,
        readiness="fail_on_critical",
    )
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        cluster.stop("fast")
        await wait_until(lambda: _snap(probers)["status"] == "critical", what="critical")
        snap = _snap(probers)
        assert snap["reason"] == "consecutive-failures"
        assert snap["consecutive_failures"] == 3
        assert snap["up"] is False and snap["healthy"] is False
        assert snap["last_failure_reason"] == "connect"
        assert isinstance(snap["last_error"], str) and snap["last_error"]
        assert snap["utilization"] is None
        assert snap["server"]["total"] is None  # type: ignore[index]
        assert probers.readiness() == ("fail", ["postgres main: critical (consecutive-failures)"])
        failed = [p for p in events.probes() if not p.ok]
        assert failed and {p.reason for p in failed} == {"connect"}, (failed, snap)

        cluster.start()
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok again")
        assert probers.readiness() == ("pass", [])
        assert _snap(probers)["consecutive_failures"] == 0
    finally:
        await probers.close()

    # The step down came on the second successful probe after the outage, not the first.
    recovery = next(
        i
        for i, e in enumerate(events.events)
        if isinstance(e, PgStatusChanged) and e.from_status == "critical"
    )
    before = [e for e in events.events[:recovery] if not isinstance(e, PgStatusChanged)]
    assert [p.ok for p in before[-3:]] == [False, True, True]
    assert events.events[recovery] == PgStatusChanged("main", "critical", "ok", "recovered")
    statuses = [c.to_status for c in events.changes()]
    assert statuses == ["ok", "degraded", "critical", "ok"]
    assert other_tasks() == []


async def test_a_blackholed_server_times_out_within_the_bound(
    cluster: Cluster, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(cluster.port)
    relay.mode = "blackhole"
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    timeout = 0.5
    started = time.monotonic()
    await probers.apply([make_target(relay.dsn(), probe_timeout=timeout, probe_interval=0.3)])
    try:
        await wait_until(lambda: bool(events.probes()), timeout=5, what="the first probe")
        elapsed = time.monotonic() - started
        assert timeout <= elapsed < timeout + 1.0
        probe = events.probes()[0]
        assert (probe.ok, probe.reason) == (False, "timeout")
        assert _snap(probers)["last_error"] == "TimeoutError: no connection within 0.5s"
        assert _snap(probers)["status"] == "degraded"
        # The loop goes on while the server stays silent, each probe bounded.
        await wait_until(lambda: _snap(probers)["status"] == "critical", what="critical")
        assert relay.open_connections >= 1
    finally:
        await probers.close()
    # Nothing is left open: the abandoned connections were closed on our side.
    await wait_until(lambda: relay.open_connections == 0, timeout=5, what="relay drained")
    assert other_tasks() == []


async def test_a_server_that_stops_answering_mid_session_times_out_and_recovers(
    cluster: Cluster, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(cluster.port)
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    await probers.apply([make_target(relay.dsn(), probe_timeout=0.5, probe_interval=0.2)])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        relay.mode = "blackhole"  # pooled connections go silent; new ones never answer
        await wait_until(lambda: _snap(probers)["status"] == "critical", what="critical")
        reasons = {p.reason for p in events.probes() if not p.ok}
        assert reasons == {"timeout"}
        relay.mode = "forward"
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="recovered")
    finally:
        await probers.close()
    assert other_tasks() == []


async def test_a_slow_network_times_out(cluster: Cluster, relay_factory: RelayFactory) -> None:
    relay = await relay_factory(cluster.port)
    relay.mode, relay.delay = "slow", 1.0
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    started = time.monotonic()
    await probers.apply([make_target(relay.dsn(), probe_timeout=0.4, probe_interval=0.3)])
    try:
        await wait_until(lambda: bool(events.probes()), timeout=5, what="the first probe")
        assert time.monotonic() - started < 0.4 + 1.0
        assert (events.probes()[0].ok, events.probes()[0].reason) == (False, "timeout")
    finally:
        await probers.close()
    assert other_tasks() == []


async def test_a_slow_probe_query_times_out_and_is_cancelled_server_side(
    cluster: Cluster,
) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    query = "SELECT pg_sleep(5) /* slow probe */"
    target = make_target(cluster.dsn(), probe_query=query, probe_timeout=0.5, probe_interval=1.0)
    started = time.monotonic()
    await probers.apply([target])
    try:
        await wait_until(lambda: bool(events.probes()), timeout=5, what="the first probe")
        assert time.monotonic() - started < 0.5 + 1.0
        assert (events.probes()[0].ok, events.probes()[0].reason) == (False, "timeout")
        assert _snap(probers)["last_error"] == "TimeoutError: query not finished within 0.5s"
    finally:
        await probers.close()

    async def no_sleeper_left() -> bool:
        count = await cluster.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", query
        )
        return int(count) == 0

    await wait_until_async(no_sleeper_left, timeout=3, what="the slow query cancelled")
    assert await _prober_backends(cluster) == 0
    assert other_tasks() == []


async def test_a_failing_probe_query_is_a_query_failure(cluster: Cluster) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    await probers.apply([make_target(cluster.dsn(), probe_query="SELECT * FROM no_such_table")])
    try:
        await wait_until(lambda: bool(events.probes()), what="the first probe")
        assert events.probes()[0].reason == "query"
        assert _snap(probers)["last_error"] == (
            'UndefinedTableError: relation "no_such_table" does not exist'
        )
    finally:
        await probers.close()


async def test_bad_credentials_are_an_auth_failure_without_the_password_anywhere(
    cluster: Cluster,
) -> None:
    wrong = "Wr0ng-Passw0rd-xyzzy"
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target(cluster.dsn(user="app", password=wrong))
    await probers.apply([target])
    try:
        await wait_until(lambda: bool(events.probes()), what="the first probe")
        snap = _snap(probers)
    finally:
        await probers.close()
    assert events.probes()[0].reason == "auth"
    assert snap["last_failure_reason"] == "auth"
    assert snap["last_error"] == (
        'InvalidPasswordError: password authentication failed for user "app"'
    )
    assert snap["dsn"] == f"postgresql://app:<redacted>@127.0.0.1:{cluster.port}/postgres"
    text = json.dumps(snap) + repr(events.events)
    assert wrong not in text

    # The right password works (the cluster really checks it).
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    await probers.apply([make_target(cluster.dsn(user="app", password=APP_PASSWORD))])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok with the password")
        assert APP_PASSWORD not in json.dumps(_snap(probers))
    finally:
        await probers.close()


async def test_an_unresolvable_host_is_a_connect_failure() -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target("postgresql://postgres@db.does-not-exist.invalid:5432/postgres")
    started = time.monotonic()
    await probers.apply([target])
    try:
        await wait_until(lambda: bool(events.probes()), what="the first probe")
        assert time.monotonic() - started < target.probe_timeout + 1.0
        # Resolvers answer NXDOMAIN for .invalid at once; one without a network may hang,
        # which the probe timeout bounds.
        assert events.probes()[0].reason in ("connect", "timeout")
        assert _snap(probers)["status"] == "degraded"
    finally:
        await probers.close()
    assert other_tasks() == []


async def test_removing_a_target_closes_its_pool(cluster: Cluster) -> None:
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([make_target(cluster.dsn(), pool_min_size=2, pool_max_size=2)])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        assert await _prober_backends(cluster) == 2
        await probers.apply([])
        assert probers.snapshots() == []
        assert other_tasks() == []

        async def gone() -> bool:
            return await _prober_backends(cluster) == 0

        await wait_until_async(gone, timeout=3, what="the prober's backends gone")
    finally:
        await probers.close()


async def test_a_changed_dsn_replaces_the_pool_and_keeps_the_history(cluster: Cluster) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target(cluster.dsn(), probe_interval=0.2)
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        as_app = replace(
            target,
            dsn=cluster.dsn(user="app", password=APP_PASSWORD),
            display_dsn=f"postgresql://app:<redacted>@127.0.0.1:{cluster.port}/postgres",
        )
        await probers.apply([as_app])
        assert _snap(probers)["dsn"] == as_app.display_dsn

        async def only_app_backends() -> bool:
            users = await cluster.fetchval(
                "SELECT array_agg(DISTINCT usename::text) FROM pg_stat_activity"
                " WHERE application_name = $1",
                PROBE_APPLICATION_NAME,
            )
            return users == ["app"]

        await wait_until_async(only_app_backends, what="the pool reconnected as app")
        assert _snap(probers)["status"] == "ok"
    finally:
        await probers.close()
    assert [c.to_status for c in events.changes()] == ["ok"]  # no detour through unknown


async def test_counts_are_partial_without_pg_monitor_and_complete_with_it(
    cluster: Cluster,
) -> None:
    target = make_target(cluster.dsn(user="watcher", password="watcher-pw"), agent_pool_size=10)
    agents = [
        await asyncpg.connect(
            cluster.dsn(), server_settings={"application_name": target.application_name}
        )
        for _ in range(2)
    ]
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        server = _snap(probers)["server"]
        assert isinstance(server, dict)
        # Other roles' rows are visible but their state is hidden.
        assert server["partial"] is True
        assert server["total"] == 2
        assert server["idle"] == 0

        await cluster.sql("GRANT pg_monitor TO watcher")

        def complete() -> bool:
            server = _snap(probers)["server"]
            assert isinstance(server, dict)
            return server["partial"] is False and server["idle"] == 2

        await wait_until(complete, what="complete counts with pg_monitor")
    finally:
        await cluster.sql("REVOKE pg_monitor FROM watcher")
        await probers.close()
        for con in agents:
            await con.close()


async def test_the_probers_own_backends_are_never_counted_as_the_agents(
    cluster: Cluster,
) -> None:
    # An agent misconfigured with the prober's own application_name.
    target = make_target(
        cluster.dsn(),
        application_name=PROBE_APPLICATION_NAME,
        pool_min_size=2,
        pool_max_size=2,
        agent_pool_size=4,
    )
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([target])
    try:
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="ok")
        assert await _prober_backends(cluster) == 2
        assert _snap(probers)["pool_size"] == 0
        assert _snap(probers)["utilization"] == 0.0
    finally:
        await probers.close()


async def test_close_with_a_probe_in_flight_leaks_nothing(
    cluster: Cluster, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(cluster.port)
    relay.mode = "blackhole"
    probers = ProberSet(SystemClock(), Recorder())
    await probers.apply([make_target(relay.dsn(), probe_timeout=5.0)])
    await wait_until(lambda: relay.open_connections >= 1, what="a connection attempt")
    # Before the first probe completes: unknown, which readiness lets pass.
    snap = _snap(probers)
    assert (snap["status"], snap["reason"], snap["healthy"]) == ("unknown", "not-probed", False)
    assert snap["last_check"] is None and snap["check_duration_ms"] is None
    assert probers.readiness() == ("pass", [])
    started = time.monotonic()
    await probers.close()
    assert time.monotonic() - started < 1.0  # close does not wait for the probe timeout
    assert other_tasks() == []
    await wait_until(lambda: relay.open_connections == 0, timeout=3, what="relay drained")
    assert asyncio.get_running_loop().is_running()


async def test_slow_round_trips_degrade_by_latency_but_a_cold_connect_does_not(
    cluster: Cluster, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(cluster.port)
    relay.mode, relay.delay = "slow", 0.1  # every chunk, each way
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    target = make_target(relay.dsn(), probe_timeout=5.0, probe_interval=0.3, degraded_latency=0.5)
    await probers.apply([target])
    try:
        await wait_until(lambda: bool(events.probes()), what="the first probe")
        first = events.probes()[0]
        # Connecting took several delayed round trips, the query itself about one.
        assert first.ok and first.duration >= 0.5
        assert _snap(probers)["status"] == "ok"

        relay.delay = 0.3  # one query round trip now takes about 0.6s
        await wait_until(lambda: _snap(probers)["status"] == "degraded", what="degraded")
        assert _snap(probers)["reason"] == "latency"
        assert _snap(probers)["up"] is True
    finally:
        await probers.close()
    assert other_tasks() == []


async def test_a_backend_killed_mid_probe_is_a_connect_failure_and_recovers(
    cluster: Cluster,
) -> None:
    events = Recorder()
    probers = ProberSet(SystemClock(), events)
    query = "SELECT pg_sleep(0.8) /* killed probe */"
    target = make_target(
        cluster.dsn(), probe_query=query, probe_timeout=3.0, probe_interval=0.2, degraded_latency=5
    )
    await probers.apply([target])
    try:

        async def killed() -> bool:
            return bool(
                await cluster.fetchval(
                    "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE query = $1 AND state = 'active'",
                    query,
                )
            )

        await wait_until_async(killed, what="the probe's backend terminated")
        await wait_until(lambda: any(not p.ok for p in events.probes()), what="a failed probe")
        failed = next(p for p in events.probes() if not p.ok)
        assert failed.reason == "connect"
        assert "administrator command" in str(_snap(probers)["last_error"])
        await wait_until(lambda: _snap(probers)["status"] == "ok", what="recovered")
    finally:
        await probers.close()
    assert [c.to_status for c in events.changes()][-2:] == ["degraded", "ok"]

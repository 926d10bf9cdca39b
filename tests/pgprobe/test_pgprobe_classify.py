"""Failure classification, password scrubbing and utilization: pure helpers of the prober."""

from __future__ import annotations

import socket

import asyncpg
import pytest

from proxy.pgprobe.prober import ServerStats, classify, dsn_secrets, scrub


def _pg_error(cls: type[asyncpg.PostgresError], message: str = "boom") -> BaseException:
    return cls(message)


@pytest.mark.parametrize(
    ("exc", "connecting", "reason"),
    [
        (TimeoutError(), True, "timeout"),
        (TimeoutError(), False, "timeout"),
        (ConnectionRefusedError(111, "Connect call failed"), True, "connect"),
        (socket.gaierror(-2, "Name or service not known"), True, "connect"),
        (_pg_error(asyncpg.InvalidPasswordError), True, "auth"),
        (_pg_error(asyncpg.InvalidAuthorizationSpecificationError), True, "auth"),
        (_pg_error(asyncpg.CannotConnectNowError), True, "connect"),
        (_pg_error(asyncpg.TooManyConnectionsError), True, "connect"),
        (_pg_error(asyncpg.InvalidCatalogNameError), True, "connect"),
        (_pg_error(asyncpg.AdminShutdownError), False, "connect"),
        (_pg_error(asyncpg.ConnectionDoesNotExistError), False, "connect"),
        (_pg_error(asyncpg.PostgresSyntaxError), False, "query"),
        (_pg_error(asyncpg.QueryCanceledError), False, "query"),
        (ValueError("weird"), False, "other"),
    ],
)
def test_failures_are_classified_into_the_reason_labels(
    exc: BaseException, connecting: bool, reason: str
) -> None:
    assert classify(exc, connecting=connecting) == reason


def test_dsn_secrets_find_the_password_raw_and_decoded() -> None:
    dsn = "postgresql://app:p%40ss%3Aw0rd@db.example:5432/app?password=other-secret&sslmode=require"
    secrets = dsn_secrets(dsn)
    assert "p%40ss%3Aw0rd" in secrets
    assert "p@ss:w0rd" in secrets
    assert "other-secret" in secrets
    assert dsn in secrets
    text = "could not connect with p@ss:w0rd / p%40ss%3Aw0rd / other-secret to " + dsn
    cleaned = scrub(text, secrets)
    for secret in ("p@ss:w0rd", "p%40ss%3Aw0rd", "other-secret"):
        assert secret not in cleaned
    assert cleaned.count("<redacted>") == 4


def test_a_dsn_without_password_scrubs_only_itself() -> None:
    dsn = "postgresql://postgres@127.0.0.1/postgres"
    assert dsn_secrets(dsn) == (dsn,)
    assert scrub("user postgres failed", dsn_secrets(dsn)) == "user postgres failed"


def _stats(total: int = 0, all_connections: int = 0, max_connections: int = 100) -> ServerStats:
    return ServerStats(
        total=total,
        active=0,
        idle=total,
        idle_in_transaction=0,
        waiting=0,
        longest_transaction_seconds=0.0,
        all_connections=all_connections,
        max_connections=max_connections,
        partial=False,
    )


def test_utilization_uses_the_agent_pool_size_when_set() -> None:
    assert _stats(total=15, all_connections=40).utilization(20) == pytest.approx(0.75)


def test_utilization_falls_back_to_all_connections_over_max_connections() -> None:
    assert _stats(total=15, all_connections=40).utilization(None) == pytest.approx(0.4)


def test_utilization_is_clamped_to_one() -> None:
    # Two agent replicas sharing one application_name can exceed one pool's size.
    assert _stats(total=30).utilization(20) == 1.0

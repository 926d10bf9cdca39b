"""Fixtures for the prober's tests: the machine's shared PostgreSQL (read-only use), a
throwaway cluster of our own that tests may stop, restart and reconfigure, and a TCP relay
on loopback that can forward, stall (blackhole) or delay traffic.

The throwaway cluster is made with initdb/pg_ctl from /usr/lib/postgresql/*/bin, owned by
the `postgres` OS user when we are root (initdb refuses root), listening on 127.0.0.1 only
on a free port, with its unix socket inside its own temp dir and fsync off. It is torn down
with `pg_ctl stop -m immediate` and `rm -rf`.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.config.model import PostgresTarget
from proxy.observe.events import Event, PgProbed, PgStatusChanged

SHARED_DSN = os.environ.get("PGPROBE_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
CLUSTER_SUPERUSER = "postgres"
APP_PASSWORD = "Sw0rdfish-Tr0ub4dor&3"  # the `app` role's password in the throwaway cluster


# -- helpers shared by the test modules ---------------------------------------------------


def make_target(dsn: str, **overrides: Any) -> PostgresTarget:
    """A target with short, test-friendly timings (interval below the config floor on
    purpose: PostgresTarget is built directly, not through validation)."""
    base = PostgresTarget(
        name="main",
        dsn=dsn,
        display_dsn=redact(dsn),
        application_name=f"pgprobe-test-{uuid.uuid4().hex[:8]}",
        probe_interval=0.2,
        probe_timeout=1.0,
        degraded_latency=0.5,
    )
    return replace(base, **overrides)


def redact(dsn: str) -> str:
    """What the config layer does for display_dsn: the password replaced."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:<redacted>@{host}"))


class Recorder:
    """Collects emitted events; `wait_for` polls (briefly, in real time) for a condition."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def probes(self) -> list[PgProbed]:
        return [e for e in self.events if isinstance(e, PgProbed)]

    def changes(self) -> list[PgStatusChanged]:
        return [e for e in self.events if isinstance(e, PgStatusChanged)]


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `predicate` every 20ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_until_async(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def run_sync(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion on a private loop (for sync session fixtures; unlike
    asyncio.run it leaves the thread's current event loop alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def other_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still pending besides the current one and the test relay's own (a leak
    check after close)."""
    current = asyncio.current_task()
    return [
        t
        for t in asyncio.all_tasks()
        if t is not current
        and not t.done()
        and not getattr(t.get_coro(), "__qualname__", "").startswith("Relay.")
    ]


# -- the shared server --------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_dsn() -> str:
    """The machine's PostgreSQL, for read-only happy-path tests. Fails (not skips) when it
    is unreachable: these tests are part of the suite's promise."""

    async def ping() -> None:
        con = await asyncpg.connect(SHARED_DSN, timeout=5)
        await con.close()

    try:
        run_sync(ping())
    except Exception as exc:
        pytest.fail(f"shared PostgreSQL at {redact(SHARED_DSN)} unreachable: {exc!r}")
    return SHARED_DSN


# -- a throwaway cluster ------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for cand in candidates:
        if Path(cand, "initdb").exists() and Path(cand, "pg_ctl").exists():
            return Path(cand)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A private PostgreSQL cluster that tests may stop, start and reconfigure."""

    bindir: Path
    base: Path
    port: int
    as_user: list[str] = field(default_factory=list)  # runuser prefix when we are root

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def dsn(self, user: str = CLUSTER_SUPERUSER, password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self.as_user, *args],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.base,
        )

    def initdb(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            CLUSTER_SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "30",
            "shared_buffers": "16MB",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # The superuser connects without a password; every other role needs SCRAM.
        (self.data / "pg_hba.conf").write_text(
            f"local all {CLUSTER_SUPERUSER} trust\n"
            f"host all {CLUSTER_SUPERUSER} 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        result = subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        return result.returncode == 0

    async def sql(self, *statements: str) -> None:
        con = await asyncpg.connect(self.dsn(), timeout=10)
        try:
            for statement in statements:
                await con.execute(statement)
        finally:
            await con.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        con = await asyncpg.connect(self.dsn(), timeout=10)
        try:
            return await con.fetchval(query, *args)
        finally:
            await con.close()


@pytest.fixture(scope="session")
def _cluster_session() -> Iterator[Cluster]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pgprobe-cluster-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = Cluster(bindir=bindir, base=base, port=_free_port(), as_user=as_user)
    try:
        cluster.initdb()
        cluster.start()
        run_sync(
            cluster.sql(
                f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'",
                "CREATE ROLE watcher LOGIN PASSWORD 'watcher-pw'",
            )
        )
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster(_cluster_session: Cluster) -> Cluster:
    """The throwaway cluster, running (a test that stopped it may have failed midway)."""
    if not _cluster_session.running():
        _cluster_session.start()
    return _cluster_session


# -- a TCP relay on loopback --------------------------------------------------------------


class Relay:
    """Listens on 127.0.0.1 and relays to a backend port. `mode`:
    `forward` relays both ways; `blackhole` accepts and then never answers (data from
    either side is dropped); `slow` relays each chunk after `delay` seconds."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.mode = "forward"
        self.delay = 2.0
        self.port = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def dsn(self, user: str = CLUSTER_SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self._writers.add(writer)
        backend_writer: asyncio.StreamWriter | None = None
        try:
            if self.mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            b_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
            self._writers.add(backend_writer)
            await asyncio.gather(self._pipe(reader, backend_writer), self._pipe(b_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            for w in (writer, backend_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.mode == "blackhole":
                    continue
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()


@pytest.fixture
async def relay_factory() -> AsyncIterator[RelayFactory]:
    relays: list[Relay] = []

    async def make(backend_port: int) -> Relay:
        relay = Relay(backend_port)
        await relay.start()
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.close()


RelayFactory = Callable[[int], Awaitable[Relay]]

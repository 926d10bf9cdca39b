"""Redis for tests: a unique key prefix on the machine's shared server, and throwaway
servers of our own that a test may kill, freeze (SIGSTOP) and restart.

A throwaway server listens on 127.0.0.1 on a free port, persists nothing, and is always
resumed and killed by whoever started it (`throwaway_redis` does it in a finally).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import redis as redis_sync
from redis.asyncio import Redis

from proxy.config.model import StateSettings
from tests.support.proxy import free_port

SHARED_URL = os.environ.get("STATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix() -> str:
    return f"rp-test-{uuid.uuid4().hex[:12]}"


def settings(url: str, prefix: str, timeout: float = 0.05) -> StateSettings:
    """What `state: {backend: redis, url, key_prefix, timeout}` compiles to."""
    return StateSettings(backend="redis", url=url, key_prefix=prefix, timeout=timeout)


def delete_prefix(url: str, prefix: str) -> None:
    client = redis_sync.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def prefix_keys(url: str, prefix: str) -> dict[str, int]:
    """Each key under the prefix with its remaining TTL in ms (-1: none, -2: gone)."""
    client = redis_sync.Redis.from_url(url, socket_timeout=2)
    try:
        return {
            key.decode(): int(client.pttl(key))
            for key in client.scan_iter(match=f"{prefix}:*", count=500)
        }
    finally:
        client.close()


@contextlib.asynccontextmanager
async def shared_prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the shared Redis, deleted afterwards."""
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        delete_prefix(SHARED_URL, prefix)


class ThrowawayRedis:
    """A redis-server process of our own on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rp-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ThrowawayRedis:
        exe = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                client = redis_sync.Redis(port=self.port, socket_timeout=0.5)
                try:
                    if client.ping():
                        return self
                finally:
                    client.close()
            except redis_sync.RedisError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("throwaway redis-server did not start")
            time.sleep(0.02)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.frozen:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        if self.proc is None:
            return
        self.thaw()
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        """Kill it and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=2)


@contextlib.contextmanager
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis().start()
    try:
        yield server
    finally:
        server.close()  # resumes a frozen one first

"""The Redis backend (`state: {backend: redis, url, key_prefix, timeout}`, DESIGN §15).

Keys (all under `key_prefix`, all expiring):

    {prefix}:bucket:{key}       hash {tokens, ts}  token bucket; expires when it would be full
    {prefix}:quota:{key}        string (JSON)      quota snapshot; expires with its ttl
    {prefix}:sidecars           sorted set         sidecar ids scored by heartbeat expiry
    {prefix}:breaker-trips      sorted set         [route, upstream] scored by open-until
    {prefix}:breaker-trips      pub/sub channel    one message per published trip

Redis is an accelerator, never a dependency: every call is bounded by `state.timeout`
(redis-py's socket and connect timeouts, and an overall deadline on top), no call is
retried by the client, every exception is caught and counted (`StateBackendErrored`), and
after `guard.FAILURES` consecutive errors the `Guard` stops all calls until a background
probe succeeds (every `guard.PROBE_EVERY` seconds). Meanwhile `take` answers from a local
bucket at `rps ÷ N` (burst ÷ N, at least one call's cost), N being the live sidecars last
counted by the heartbeat; quota snapshots are read from the local copy; trips are not
published. When Redis answers again the local buckets are dropped and the shared ones rule.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.exceptions import NoScriptError

from proxy.clock import Clock
from proxy.config.compile import display_dsn
from proxy.config.model import StateSettings
from proxy.observe.events import StateBackendChanged, StateBackendErrored
from proxy.state.bucket import LocalBuckets, QuotaBoard, Snapshot
from proxy.state.guard import Guard
from proxy.state.lua import HEARTBEAT, TAKE, TRIP, Script

__all__ = ["HEARTBEAT_EVERY", "MAX_CONNECTIONS", "RedisBackend"]

HEARTBEAT_EVERY: Final = 2.0  # seconds between heartbeats; a beat lives 3× as long
MAX_CONNECTIONS: Final = 32  # commands in flight at once; more wait (within the timeout)
RESUBSCRIBE_EVERY: Final = 1.0  # seconds between pub/sub (re)connection attempts
LISTEN_POLL: Final = 1.0  # seconds a pub/sub read waits before looking again

StateEvent = StateBackendChanged | StateBackendErrored


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        settings: StateSettings,
        clock: Clock,
        emit: Callable[[StateEvent], None] | None = None,
        *,
        heartbeat_every: float = HEARTBEAT_EVERY,
    ) -> None:
        self.settings = settings
        self.url = settings.url or ""
        self.where = display_dsn(self.url)[0]  # for logs and /status: the password redacted
        self._clock = clock
        self._emit: Callable[[StateEvent], None] = emit or _ignore
        self._timeout = settings.timeout
        self._heartbeat_every = heartbeat_every
        self._heartbeat_ttl = 3 * heartbeat_every
        prefix = settings.key_prefix
        self._bucket_prefix = f"{prefix}:bucket:"
        self._quota_prefix = f"{prefix}:quota:"
        self._sidecars_key = f"{prefix}:sidecars"
        self._trips_key = self._channel = f"{prefix}:breaker-trips"
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._guard = Guard(clock)
        self._local = LocalBuckets()
        self._quotas = QuotaBoard()
        self._peers = 1
        self._callbacks: list[Callable[[str, str, float], None]] = []
        self._client: Redis | None = None
        self._subscriber: Redis | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_beat = 0.0
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (bounded by the timeout), take the first heartbeat, start the heartbeat
        and pub/sub tasks. Never raises: an unreachable Redis starts the backend down."""
        self._started = True
        timeout = self._timeout
        try:
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=MAX_CONNECTIONS,
                timeout=timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
            # Pub/sub reads wait for messages: no read timeout there, only on connecting.
            sub_pool = ConnectionPool.from_url(
                self.url, max_connections=2, socket_connect_timeout=timeout
            )
        except Exception as exc:  # noqa: BLE001 - a URL redis-py cannot use: stay down, never crash
            self._guard.go_down()
            self._emit(StateBackendErrored(self.name, "probe"))
            self._announce(up=False, error=type(exc).__name__)
            return
        self._client = Redis.from_pool(pool)
        self._subscriber = Redis.from_pool(sub_pool)
        ok, error = await self._beat(bypass=True)
        if ok:
            self._announce(up=True)
        else:
            self._guard.go_down()
            self._emit(StateBackendErrored(self.name, "heartbeat"))
            self._announce(up=False, error=error)
        self._next_beat = self._clock.now() + self._heartbeat_every
        self._spawn(self._maintain())
        self._spawn(self._listen())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # redis-py can swallow a cancellation that lands while a pub/sub read times out, so
        # cancel until the tasks are gone (they also stop by themselves on `_closed`).
        while self._tasks:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait(list(self._tasks), timeout=0.1)
        client = self._client
        if client is not None and self._guard.up:
            try:  # leave the live count at once rather than when our beat expires
                async with asyncio.timeout(self._timeout):
                    await cast(Awaitable[Any], client.zrem(self._sidecars_key, self.id))
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        for c in (self._client, self._subscriber):
            if c is not None:
                try:
                    await c.aclose()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
        self._client = self._subscriber = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- state -----------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._started and not self._closed and self._guard.up and self._client is not None

    def live_peers(self) -> int:
        return self._peers

    def snapshot(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "available": self.available,
            "peers": self._peers,
            "where": self.where,
            "key_prefix": self.settings.key_prefix,
        }

    # -- the API ---------------------------------------------------------------------------

    async def take(self, key: str, rps: float, burst: float, cost: int = 1) -> tuple[bool, float]:
        """Token bucket shared by the fleet; locally at rps ÷ N while Redis is unavailable."""
        rps = max(rps, 1e-9)
        if self._ready():
            ok, reply = await self._call(
                "take", lambda c: _script(c, TAKE, self._bucket_prefix + key, rps, burst, cost)
            )
            if ok:
                try:
                    return bool(int(reply[0])), float(reply[1])
                except (TypeError, ValueError, IndexError):
                    self._failed("take", "BadReply")
        n = self._peers
        local_burst = max(burst / n, min(float(cost), burst))
        return self._local.take(key, self._clock.now(), rps / n, local_burst, cost)

    async def put_quota(self, key: str, snapshot: Snapshot, ttl: float) -> None:
        """Kept locally too, so it still holds here while Redis is unavailable."""
        self._quotas.put(key, snapshot, ttl, self._clock.now())
        if not self._ready():
            return
        name = self._quota_prefix + key
        if not math.isfinite(ttl) or ttl <= 0:
            await self._call("put-quota", lambda c: c.delete(name))
            return
        data = json.dumps(snapshot, separators=(",", ":"))
        px = max(1, math.ceil(ttl * 1000))
        await self._call("put-quota", lambda c: c.set(name, data, px=px))

    async def get_quota(self, key: str) -> Snapshot | None:
        """The fleet's snapshot for `key`, else this sidecar's own, else None."""
        if self._ready():
            ok, raw = await self._call("get-quota", lambda c: c.get(self._quota_prefix + key))
            if ok and raw is not None:
                snapshot = _decode_snapshot(raw)
                if snapshot is not None:
                    return snapshot
        return self._quotas.get(key, self._clock.now())

    async def publish_trip(self, route: str, upstream: str, until_wall: float) -> None:
        """Tell the fleet this (route, upstream) breaker is open until `until_wall` (epoch
        seconds). Sent as seconds left, so the sidecars' wall clocks need not agree."""
        hold = until_wall - self._clock.wall()
        if not self._ready() or not math.isfinite(hold) or hold <= 0:
            return
        member = json.dumps([route, upstream])
        message = json.dumps({"route": route, "upstream": upstream, "hold": hold, "id": self.id})
        await self._call(
            "publish-trip",
            lambda c: _script(c, TRIP, self._trips_key, member, hold, self._channel, message),
        )

    def on_trip(self, callback: Callable[[str, str, float], None]) -> None:
        """`callback(route, upstream, until_wall)` for each trip a peer publishes (never for
        our own), and for each trip still in force when we (re)subscribe."""
        self._callbacks.append(callback)

    # -- calls -----------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._client is not None and self._guard.up and not self._closed

    async def _call(self, op: str, fn: Callable[[Redis], Awaitable[Any]]) -> tuple[bool, Any]:
        """(True, reply) or (False, None) after counting the failure. Never raises."""
        client = self._client
        if client is None:
            return False, None
        try:
            async with asyncio.timeout(self._timeout):
                reply = await fn(client)
        except Exception as exc:  # noqa: BLE001 - Redis must never fail a request
            self._failed(op, type(exc).__name__)
            return False, None
        self._guard.succeeded()
        return True, reply

    def _failed(self, op: str, error: str) -> None:
        self._emit(StateBackendErrored(self.name, op))
        if self._guard.failed():
            self._announce(up=False, error=error)

    def _announce(self, *, up: bool, error: str = "") -> None:
        self._emit(
            StateBackendChanged(self.name, up=up, where=self.where, error=error, peers=self._peers)
        )

    async def _beat(self, *, bypass: bool = False) -> tuple[bool, str]:
        """One heartbeat: refresh ours, count the live ones. `bypass`: also while down (the
        probe). Returns (ok, error class)."""
        client = self._client
        if client is None or (not bypass and not self._guard.up):
            return False, ""
        try:
            async with asyncio.timeout(self._timeout):
                alive = await _script(
                    client, HEARTBEAT, self._sidecars_key, self.id, self._heartbeat_ttl
                )
            self._peers = max(1, int(alive))
        except Exception as exc:  # noqa: BLE001 - counted by the caller
            return False, type(exc).__name__
        return True, ""

    # -- background ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Heartbeats while up; probes every PROBE_EVERY seconds while down."""
        clock = self._clock
        while not self._closed:
            due_in = self._guard.probe_due_in()
            if due_in is None:
                due_in = self._next_beat - clock.now()
            if due_in > 0:
                await clock.sleep(due_in)
                continue
            if self._guard.up:
                self._next_beat = clock.now() + self._heartbeat_every
                ok, error = await self._beat()
                if not ok:
                    self._failed("heartbeat", error)
                else:
                    self._guard.succeeded()
                continue
            ok, error = await self._beat(bypass=True)
            if ok and self._guard.probe_succeeded():
                self._local.clear()  # the shared buckets rule again
                self._next_beat = clock.now() + self._heartbeat_every
                self._announce(up=True)
            elif not ok:
                self._emit(StateBackendErrored(self.name, "probe"))
                self._guard.probe_failed()

    async def _listen(self) -> None:
        """Hear peers' trips; after every (re)subscription, read the trips still in force."""
        while not self._closed:
            subscriber = self._subscriber
            if subscriber is None or not self._guard.up:
                await self._clock.sleep(RESUBSCRIBE_EVERY)
                continue
            pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self._timeout):
                    await pubsub.subscribe(self._channel)
                await self._sync_trips()
                while not self._closed:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_POLL
                    )
                    if message is not None and message.get("type") == "message":
                        self._heard(message.get("data"))
            except Exception as exc:  # noqa: BLE001 - counted; we resubscribe
                self._failed("subscribe", type(exc).__name__)
            finally:
                try:  # returns the connection to the pool (its disconnect is bounded by
                    # the connect timeout): cutting it short could leak a pool slot
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
            await self._clock.sleep(RESUBSCRIBE_EVERY)

    async def _sync_trips(self) -> None:
        async def read(client: Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrange(self._trips_key, 0, -1, withscores=True)
                return await pipe.execute()

        ok, replies = await self._call("subscribe", read)
        if not ok:
            return
        (seconds, micros), trips = replies
        server_now = float(seconds) + float(micros) / 1e6
        wall = self._clock.wall()
        for member, until in trips:
            try:
                route, upstream = json.loads(member)
            except (ValueError, TypeError):
                continue
            left = float(until) - server_now
            if left > 0 and isinstance(route, str) and isinstance(upstream, str):
                self._deliver(route, upstream, wall + left)

    def _heard(self, data: object) -> None:
        try:
            message = json.loads(cast(bytes, data))
            route, upstream = message["route"], message["upstream"]
            hold, origin = float(message["hold"]), message.get("id")
        except (ValueError, TypeError, KeyError):
            return  # not one of ours
        if origin == self.id or not isinstance(route, str) or not isinstance(upstream, str):
            return  # our own trip comes back to us: never act on it (no loops)
        if math.isfinite(hold) and hold > 0:
            self._deliver(route, upstream, self._clock.wall() + hold)

    def _deliver(self, route: str, upstream: str, until_wall: float) -> None:
        for callback in self._callbacks:
            try:
                callback(route, upstream, until_wall)
            except Exception:  # noqa: BLE001 - a subscriber must not stop the listener
                pass


async def _script(client: Redis, script: Script, key: str, *args: float | str) -> Any:
    """EVALSHA, or EVAL when the server does not know the script (it then caches it)."""
    try:
        return await client.evalsha(script.sha, 1, key, *args)
    except NoScriptError:
        return await client.eval(script.source, 1, key, *args)


def _decode_snapshot(raw: object) -> Snapshot | None:
    try:
        value = json.loads(cast(bytes, raw))
    except (ValueError, TypeError):
        return None
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in value.items() if isinstance(v, int | float | str)}


def _ignore(event: StateEvent) -> None:
    return None

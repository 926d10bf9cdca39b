"""Quota stage, per target just outside the breaker (DESIGN §6, §14).

Before an attempt: ask the upstream's `QuotaTracker` whether the request's credential
partition may send now. If not, the request waits in a bounded FIFO queue when the reset
(or the secondary-limit pause) ends within its time left, else it is refused with reason
`quota` and Retry-After; nothing is sent, so the refusal costs no attempt. After an
attempt: the provider's headers (and, for the few answers that need it, the small body
that already arrived) are folded into the tracker, and a Hugging Face "model loading" 503
carries its `estimated_time` to the retry stage as a server-requested wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import deque
from typing import Protocol

from multidict import MultiMapping

from proxy.cache.key import CREDENTIAL_HEADERS, partition_of
from proxy.clock import Clock
from proxy.config.model import QuotaPolicy, Upstream
from proxy.resilience.quota import (
    ADAPTERS,
    BODY_LIMIT,
    QuotaTracker,
    github_resource,
    needs_body,
)
from proxy.stages.call import Call, Result, Stage
from proxy.upstream import UpstreamResponse

GateKey = tuple[bytes | None, str]
Snapshot = dict[str, float | int | str]
REFRESH = 1.0  # seconds: how stale the fleet's view of a quota may be before it is read again
MAX_FETCHED = 10_000


class SharedQuotas(Protocol):
    """The part of the fleet state backend quotas use (proxy.state.StateBackend)."""

    name: str

    async def put_quota(self, key: str, snapshot: Snapshot, ttl: float) -> None: ...

    async def get_quota(self, key: str) -> Snapshot | None: ...


class QuotaState:
    """One upstream's quota tracker and its waiting requests; kept across reloads."""

    def __init__(
        self, upstream: Upstream, policy: QuotaPolicy, clock: Clock, secret: bytes | None = None
    ) -> None:
        self.name = upstream.name
        self.clock = clock
        self.tracker = QuotaTracker(policy.reserve)
        self._secret = secret if secret is not None else os.urandom(32)
        self._gates: dict[GateKey, deque[tuple[float, asyncio.Future[None]]]] = {}
        self._tasks: dict[GateKey, asyncio.Task[None]] = {}
        self.queued = 0
        self.closed = False
        # Fleet sharing (DESIGN §15): snapshots of the shared partition (no client
        # credentials of its own: every sidecar meters the same injected token) are
        # published on change and read when unknown or older than REFRESH.
        self.backend: SharedQuotas | None = None
        self._fetched: dict[str, float] = {}
        self._dirty: dict[str, tuple[Snapshot, float]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.update(upstream, policy)

    def update(self, upstream: Upstream, policy: QuotaPolicy) -> None:
        self.policy = policy
        self.tracker.reserve = policy.reserve
        self.adapter = ADAPTERS[policy.headers]
        # The provider meters the credential it receives: headers the proxy injects replace
        # the client's, so they do not split the quota into partitions.
        injected = {name for name, _ in upstream.headers}
        if upstream.userinfo is not None:
            injected.add("authorization")
        self._credentials = tuple(h for h in CREDENTIAL_HEADERS if h not in injected)

    def shared_key(self, partition: bytes | None, resource: str) -> str | None:
        """The fleet key of a partition's quota; None for callers' own credentials, which
        are partitioned by a per-process secret and never leave the process."""
        if partition is not None or self.backend is None:
            return None
        return f"{self.name}:{resource or '-'}"

    async def refresh(self, partition: bytes | None, resource: str) -> None:
        """Adopt the fleet's snapshot of this quota when ours is unknown or stale."""
        key = self.shared_key(partition, resource)
        backend = self.backend
        if key is None or backend is None:
            return
        now = self.clock.now()
        last = self._fetched.get(key)
        if last is not None and now - last < REFRESH:
            return
        if len(self._fetched) >= MAX_FETCHED:
            self._fetched.clear()
        self._fetched[key] = now
        snapshot = await backend.get_quota(key)
        if not snapshot:
            return
        try:
            remaining = int(snapshot.get("remaining", 0))
            reset_wall = float(snapshot.get("reset_wall", 0.0))
            pause_wall = float(snapshot.get("pause_wall", 0.0))
        except (TypeError, ValueError):
            return
        now, wall = self.clock.now(), self.clock.wall()
        self.tracker.restore(
            partition,
            resource,
            remaining,
            now + (reset_wall - wall) if reset_wall else 0.0,
            now + (pause_wall - wall) if pause_wall else 0.0,
            now,
        )

    def publish(self, partition: bytes | None, resource: str) -> None:
        """Queue the current snapshot for the fleet; one writer task, latest value wins."""
        key = self.shared_key(partition, resource)
        if key is None:
            return
        state = self.tracker.snapshot(partition, resource)
        if state is None:
            return
        remaining, reset_at, pause_until = state
        now, wall = self.clock.now(), self.clock.wall()
        until = max(reset_at, pause_until)
        ttl = until - now
        if ttl <= 0:
            return
        snapshot: Snapshot = {
            "remaining": remaining,
            "reset_wall": wall + (reset_at - now) if reset_at else 0.0,
            "pause_wall": wall + (pause_until - now) if pause_until > now else 0.0,
        }
        self._dirty[key] = (snapshot, ttl)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty and self.backend is not None:
                key = next(iter(self._dirty))
                snapshot, ttl = self._dirty.pop(key)
                await self.backend.put_quota(key, snapshot, ttl)
        finally:
            self._flusher = None

    def admits(self) -> bool:
        """Whether the shared partition could send now (for failover's look-ahead)."""
        resource = "core" if self.policy.headers == "github" else ""
        return self.tracker.peek(None, resource, self.clock.now()) <= 0.0

    def partition(self, headers: MultiMapping[str]) -> bytes | None:
        if not self._credentials:
            return None
        return partition_of(self._secret, headers, (), self._credentials)

    async def wait(self, key: GateKey, until: float) -> bool:
        """Wait, in FIFO order with the others of this partition and resource, until `until`;
        False when the state was closed meanwhile (the upstream's quota went with a reload)."""
        if self.closed:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = deque()
        entry = (until, fut)
        gate.append(entry)
        self.queued += 1
        if key not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._release(key))
            self._tasks[key] = task
        try:
            await fut
        finally:
            self.queued -= 1
            if not fut.done():
                fut.cancel()
            try:
                gate.remove(entry)
            except ValueError:
                pass  # already released
        return not self.closed

    async def _release(self, key: GateKey) -> None:
        gate = self._gates[key]
        clock = self.clock
        try:
            while gate:
                until = gate[0][0]
                now = clock.now()
                if until > now:
                    await clock.sleep(until - now)
                    continue
                while gate and gate[0][0] <= clock.now():
                    _, fut = gate.popleft()
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._tasks.pop(key, None)
            if not gate:
                self._gates.pop(key, None)

    def close(self) -> None:
        """The upstream's quota was removed (or the app stops): every waiter is let go."""
        self.closed = True
        for task in self._tasks.values():
            task.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        for gate in self._gates.values():
            for _, fut in gate:
                if not fut.done():
                    fut.set_result(None)
            gate.clear()


class QuotaStage(Stage):
    """`waits`: False on a failover target that is skipped when spent (refuse at once)."""

    __slots__ = ("clock", "github", "kind", "state", "waits")

    def __init__(
        self, next_stage: Stage, state: QuotaState, clock: Clock, *, waits: bool = True
    ) -> None:
        super().__init__(next_stage)
        self.state = state
        self.clock = clock
        self.waits = waits
        self.kind = state.policy.headers
        self.github = self.kind == "github"

    async def __call__(self, call: Call) -> Result:
        state = self.state
        clock = self.clock
        tracker = state.tracker
        partition = state.partition(call.request_headers)
        resource = github_resource(call.path_qs) if self.github else ""
        if state.backend is not None:
            await state.refresh(partition, resource)
        while True:
            now = clock.now()
            wait = tracker.admit(partition, resource, now)
            if wait <= 0.0:
                break
            deadline = call.deadline
            if (
                not self.waits
                or (deadline is not None and now + wait >= deadline)
                or state.queued >= state.policy.max_queued
            ):
                call.record.rate_limited = "quota"
                return Result(failure="quota", retry_after=wait)
            if not await state.wait((partition, resource), now + wait):
                call.record.rate_limited = "quota"
                return Result(failure="quota", retry_after=max(0.0, now + wait - clock.now()))
        assert self.next is not None
        result = await self.next(call)
        response = result.response
        if response is None:
            return result
        status = response.status
        body = _peek_body(response) if needs_body(self.kind, status) else None
        reading = state.adapter(status, response.headers, body, clock.wall())
        if reading.empty:
            return result
        if reading.refused:
            call.record.rate_limited = "upstream"
        if tracker.observe(partition, reading, clock.now(), resource):
            state.publish(partition, reading.resource or resource)
        attempt = result.attempt
        if reading.estimated_time is not None and attempt is not None:
            wait = max(reading.estimated_time, attempt.retry_after or 0.0)
            result.attempt = dataclasses.replace(attempt, retry_after=wait)
        return result


class _Replay:
    """A response body already read whole, offered again through the reader interface the
    handler uses (`is_eof`, `read_nowait`, `readany`, `read`)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data

    async def readany(self) -> bytes:
        return self.read_nowait()

    async def read(self, n: int = -1) -> bytes:
        return self.read_nowait()


def _peek_body(response: UpstreamResponse) -> bytes | None:
    """The body, when it arrived whole with the head and is small (an error answer); the
    response keeps it for the client. A body still streaming is not waited for."""
    content = response.content
    is_eof = getattr(content, "is_eof", None)
    if is_eof is None or not is_eof():
        return None
    data = bytes(content.read_nowait())
    response.content = _Replay(data)  # type: ignore[assignment]
    return data if len(data) <= BODY_LIMIT else None

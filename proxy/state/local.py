"""The local backend (`state: {backend: local}`, the default): nothing is shared.

Shared limits behave like local ones, quota snapshots stay in this process, and breaker
trips are not published. `available` is always True and `live_peers()` is 1.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.clock import Clock
from proxy.observe.events import StateBackendChanged
from proxy.state.bucket import LocalBuckets, QuotaBoard, Snapshot

__all__ = ["LocalBackend"]


class LocalBackend:
    name = "local"

    def __init__(
        self, clock: Clock, emit: Callable[[StateBackendChanged], None] | None = None
    ) -> None:
        self._clock = clock
        self._emit = emit
        self._buckets = LocalBuckets()
        self._quotas = QuotaBoard()

    async def start(self) -> None:
        return None  # nothing to reach: no events, no state_backend_* series

    async def close(self) -> None:
        return None

    @property
    def available(self) -> bool:
        return True

    def live_peers(self) -> int:
        return 1

    async def take(self, key: str, rps: float, burst: float, cost: int = 1) -> tuple[bool, float]:
        return self._buckets.take(key, self._clock.now(), rps, burst, cost)

    async def put_quota(self, key: str, snapshot: Snapshot, ttl: float) -> None:
        self._quotas.put(key, snapshot, ttl, self._clock.now())

    async def get_quota(self, key: str) -> Snapshot | None:
        return self._quotas.get(key, self._clock.now())

    async def publish_trip(self, route: str, upstream: str, until_wall: float) -> None:
        return None  # no fleet to tell

    def on_trip(self, callback: Callable[[str, str, float], None]) -> None:
        return None  # no peer ever trips

    def snapshot(self) -> dict[str, object]:
        return {"backend": self.name, "available": True, "peers": 1}

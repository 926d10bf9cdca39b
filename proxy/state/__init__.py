"""Fleet state (DESIGN §15): what sidecars of one Deployment share, behind one interface.

    StateBackend            the protocol the rest of the proxy uses (`registry.state`)
    ├── LocalBackend        `backend: local` (default): nothing shared
    └── RedisBackend        `backend: redis`: shared token buckets, quota snapshots and
                            breaker trips; Redis down → local answers, never an error
    BreakerSharing          `breaker.share: true`: publishes local trips, applies peers'

`make_backend` picks one from the config; the app starts it, swaps it on a reload whose
`state` block changed, and closes it at exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.clock import Clock
from proxy.config.model import StateSettings
from proxy.observe.events import StateBackendChanged, StateBackendErrored
from proxy.state.bucket import Snapshot
from proxy.state.local import LocalBackend

if TYPE_CHECKING:
    from proxy.state.redis_backend import RedisBackend

__all__ = ["LocalBackend", "RedisBackend", "Snapshot", "StateBackend", "make_backend"]


def __getattr__(name: str) -> object:
    # redis-py adds about 7 MB to the RSS of every sidecar: imported only once a config
    # (or a caller) asks for the Redis backend, never by a proxy on `backend: local`.
    if name == "RedisBackend":
        from proxy.state.redis_backend import RedisBackend

        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StateBackend(Protocol):
    name: str  # "local" | "redis": the `backend` label of the state_backend_* metrics

    async def start(self) -> None:
        """Connect and start background work; never raises (an unreachable Redis starts
        the backend unavailable)."""

    async def close(self) -> None: ...

    @property
    def available(self) -> bool:
        """False while Redis is down or its guard is open (then `take` answers locally)."""

    def live_peers(self) -> int:
        """Sidecars seen by heartbeat, this one included (≥ 1; 1 for local)."""

    async def take(self, key: str, rps: float, burst: float, cost: int = 1) -> tuple[bool, float]:
        """Take `cost` tokens from the bucket `key` (`rps` per second, up to `burst`):
        (allowed, retry_after_seconds). Atomic across the fleet; never raises: while Redis
        is unavailable it answers from a local bucket at rps ÷ live_peers()."""

    async def put_quota(self, key: str, snapshot: Snapshot, ttl: float) -> None:
        """Store a quota snapshot for `ttl` seconds (≤ 0: delete it). Never raises."""

    async def get_quota(self, key: str) -> Snapshot | None:
        """The snapshot stored by any sidecar (or this one), None if none. Never raises."""

    async def publish_trip(self, route: str, upstream: str, until_wall: float) -> None:
        """Tell the fleet this breaker is open until `until_wall` (epoch seconds)."""

    def on_trip(self, callback: Callable[[str, str, float], None]) -> None:
        """Call `callback(route, upstream, until_wall)` when a peer's trip arrives."""

    def snapshot(self) -> dict[str, object]:
        """For /status: backend, available, peers (and the redacted address)."""


def make_backend(
    settings: StateSettings,
    clock: Clock,
    emit: Callable[[StateBackendChanged | StateBackendErrored], None] | None = None,
) -> StateBackend:
    """The configured backend, not yet started."""
    if settings.backend == "redis":
        from proxy.state.redis_backend import RedisBackend

        return RedisBackend(settings, clock, emit)
    return LocalBackend(clock, emit)

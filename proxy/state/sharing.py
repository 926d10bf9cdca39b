"""Breaker sharing (`breaker.share: true`, DESIGN §15): one sidecar's trip opens the fleet's.

A local trip to OPEN (any reason but "peer" or "restored") of an enforcing breaker whose
policy shares is published with its open-until; a trip heard from a peer opens the same
(route, upstream) breaker here through `Breaker.trip_from_peer`, which follows the state
machine's rules and emits reason "peer". Peers' trips are never re-published, so nothing
loops; each sidecar then runs its own half-open trials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Final

from proxy.clock import Clock
from proxy.observe.events import BreakerTransitioned, Event
from proxy.resilience.breaker import Breaker
from proxy.state import StateBackend

__all__ = ["NOT_PUBLISHED", "BreakerSharing"]

NOT_PUBLISHED: Final = frozenset(("peer", "restored"))  # trips that did not happen here, now


class BreakerSharing:
    """Subscribe `on_event` to the event bus; `attach` each backend the app starts."""

    def __init__(
        self,
        breakers: Mapping[tuple[str, str], Breaker],
        backend: Callable[[], StateBackend],
        clock: Clock,
    ) -> None:
        self._breakers = breakers  # the registry's live mapping
        self._backend = backend
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()

    def attach(self, backend: StateBackend) -> None:
        backend.on_trip(self.on_peer_trip)

    def on_event(self, event: Event) -> None:
        if not isinstance(event, BreakerTransitioned) or event.to_state != "open":
            return
        if event.reason in NOT_PUBLISHED:
            return
        breaker = self._breakers.get((event.route, event.upstream))
        if breaker is None or not breaker.policy.share or breaker.policy.mode != "enforce":
            return  # an observe-only trip must not make enforcing peers reject
        until = breaker.hold_until_wall(self._clock.wall())
        if until is None:
            return
        backend = self._backend()
        task = asyncio.get_running_loop().create_task(
            backend.publish_trip(event.route, event.upstream, until)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def on_peer_trip(self, route: str, upstream: str, until_wall: float) -> None:
        breaker = self._breakers.get((route, upstream))
        if breaker is not None and breaker.policy.share:
            breaker.trip_from_peer(until_wall, self._clock.wall())

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

"""The circuit breaker of one (route, upstream): a small state machine over attempt outcomes.

States (the `breaker_state{state}` labels) and the legal moves between them, all listed in
`TRANSITIONS` and all made by `Breaker._transition`, which emits one `BreakerTransitioned`:

    closed ──trip──▶ open ──hold over──▶ half_open ──all trials ok──▶ closed
                      ▲                     │
                      └──a trial failed or outlived half_open_max_wait (open_for doubles)
    any ──operator──▶ forced_open | forced_closed | disabled ──reset──▶ closed
    closed | half_open ──a peer sidecar tripped (`trip_from_peer`)──▶ open

The breaker reads outcomes already classified by the attempt (`Attempt`), never does I/O,
and evaluates time lazily: an expired hold or an overdue trial is noticed on the next call
(`acquire`, `record`, `release`, `state`, `snapshot`, `poll`), dated to when it happened.
Every permit carries the generation it was granted in; each transition starts a new
generation, so an outcome that arrives after the state changed is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.clock import Clock
from proxy.config.model import BreakerPolicy, FailureRatePolicy
from proxy.observe.events import BreakerTransitioned, Event
from proxy.resilience.classify import Attempt, AttemptResult
from proxy.resilience.windows import OutcomeWindow, WindowShape, make_window, shape_of

__all__ = ["TRANSITIONS", "Breaker", "BreakerState", "Permit"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"
    DISABLED = "disabled"


_S = BreakerState

# Every legal transition, in one place. Operators may force or reset from anywhere; a
# reload may disable (`mode: disabled`) from anywhere and re-enable into closed.
TRANSITIONS: Final[Mapping[BreakerState, frozenset[BreakerState]]] = {
    _S.CLOSED: frozenset({_S.OPEN, _S.FORCED_OPEN, _S.FORCED_CLOSED, _S.DISABLED}),
    _S.OPEN: frozenset({_S.HALF_OPEN, _S.CLOSED, _S.FORCED_OPEN, _S.FORCED_CLOSED, _S.DISABLED}),
    _S.HALF_OPEN: frozenset({_S.CLOSED, _S.OPEN, _S.FORCED_OPEN, _S.FORCED_CLOSED, _S.DISABLED}),
    _S.FORCED_OPEN: frozenset({_S.CLOSED, _S.FORCED_CLOSED, _S.DISABLED}),
    _S.FORCED_CLOSED: frozenset({_S.CLOSED, _S.FORCED_OPEN, _S.DISABLED}),
    _S.DISABLED: frozenset({_S.CLOSED, _S.FORCED_OPEN, _S.FORCED_CLOSED}),
}

_FORCEABLE: Final = frozenset({_S.FORCED_OPEN, _S.FORCED_CLOSED, _S.DISABLED})
_MAX_DOUBLINGS: Final = 62  # 2**62 * 1 s is beyond any open_for_max: stop counting there
_DEFAULT_RATE: Final = FailureRatePolicy()  # min_calls for a slow-call-only breaker


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one attempt. Hand it back with `record` (finished) or `release`
    (cancelled). `shadow` permits are granted only in `mode: observe` where enforcement
    would have rejected; their outcomes are not recorded (they would not have existed)."""

    generation: int
    token: int = 0  # non-zero for a half-open trial
    records: bool = True
    shadow: bool = False

    @property
    def trial(self) -> bool:
        return self.token != 0


class Breaker:
    """Circuit breaker for one route and upstream, per DESIGN §6 "Breaker"."""

    def __init__(
        self,
        route: str,
        upstream: str,
        policy: BreakerPolicy,
        clock: Clock,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        self.route = route
        self.upstream = upstream
        self._policy = policy
        self._clock = clock
        self._emit = emit
        self._state = _S.DISABLED if policy.mode == "disabled" else _S.CLOSED
        self._operator = False  # the current state was set by an operator (until reset)
        self._generation = 0
        self._shape: WindowShape | None = shape_of(policy)
        self._window: OutcomeWindow | None = (
            make_window(self._shape, clock) if self._shape is not None else None
        )
        self._consecutive = 0
        self._doublings = 0  # open_for = open_for_base * 2**doublings, capped
        self._opened_at = 0.0  # monotonic time the current open period began
        self._opened_wall = 0.0  # the same as epoch seconds, fixed when it opened
        self._retry_after_until: float | None = None  # latest time a server asked us to wait
        self._peer_until: float | None = None  # hold set by a peer's trip (monotonic)
        self._trials: dict[int, float] = {}  # half-open trial token → start time
        self._trial_successes = 0
        self._next_token = 1
        self._permit = self._shared_permit()
        self._trips = 0  # automatic trips (transitions into open) since start
        self._last_trip = ""  # why it last opened (or "operator" when forced open)

    # -- reading -------------------------------------------------------------------------

    @property
    def policy(self) -> BreakerPolicy:
        return self._policy

    @property
    def state(self) -> BreakerState:
        """The current state, after applying any transition that time has made due."""
        self.poll()
        return self._state

    @property
    def open_for(self) -> float:
        """The open period (seconds) the next or current trip holds: base * 2^re-trips, capped."""
        base = self._policy.open_for
        return min(max(base, self._policy.open_for_max), base * 2.0**self._doublings)

    def _hold_until(self) -> float:
        """max(opened + open_for, min(retry_after_time, opened + open_for_max)); after a
        peer's trip, the peer's open-until instead."""
        if self._peer_until is not None:
            return self._peer_until
        hold = self._opened_at + self.open_for
        if self._retry_after_until is not None:
            cap = self._opened_at + max(self._policy.open_for, self._policy.open_for_max)
            hold = max(hold, min(self._retry_after_until, cap))
        return hold

    def hold_until_wall(self, wall_now: float) -> float | None:
        """Epoch seconds until which an open breaker rejects (None unless open): what a
        shared trip publishes to the fleet. Reads the state as last evaluated (no poll), so
        it is safe to call from a transition's event."""
        if self._state is not _S.OPEN:
            return None
        return self._hold_until() - self._clock.now() + wall_now

    def reported_state(self) -> BreakerState:
        """The state as metrics and `/status` show it (DESIGN §9): a breaker whose hold is
        over reports `open` until a trial permit is actually granted, so a breaker nobody
        calls stays `open` instead of turning `half_open` at the first look."""
        self._poll(self._clock.now())
        return self._reported()

    def _reported(self) -> BreakerState:
        state = self._state
        if state is _S.HALF_OPEN and not self._trials and not self._trial_successes:
            return _S.OPEN
        return state

    def opened_at_wall(self) -> float:
        """Epoch seconds when the breaker last left closed (open, half_open or forced
        open); 0.0 while closed, forced closed or disabled."""
        if self._state not in (_S.OPEN, _S.HALF_OPEN, _S.FORCED_OPEN):
            return 0.0
        return self._opened_wall

    def retry_after(self) -> int:
        """Whole seconds (≥ 1) until the breaker may let a trial through: the Retry-After of
        a breaker-open rejection."""
        now = self._clock.now()
        self._poll(now)
        if self._state is _S.OPEN:
            wait = self._hold_until() - now
        elif self._state is _S.HALF_OPEN and self._trials:
            wait = min(self._trials.values()) + self._policy.half_open_max_wait - now
        elif self._state is _S.FORCED_OPEN:
            wait = self.open_for
        else:
            wait = 1.0
        return max(1, math.ceil(wait))

    def snapshot(self) -> dict[str, object]:
        """The breaker for `/status`: state, window rates, counters, open timing."""
        now = self._clock.now()
        self._poll(now)
        window = self._window
        reported = self._reported()
        until_half_open = None
        if self._state is _S.OPEN:
            until_half_open = max(0.0, self._hold_until() - now)
        elif reported is _S.OPEN:
            until_half_open = 0.0  # the hold is over: the next call gets a trial permit
        opened = self.opened_at_wall()
        return {
            "state": reported.value,
            "mode": self._policy.mode,
            "forced": self._operator,
            "failure_rate": window.failure_rate if window is not None else 0.0,
            "slow_rate": window.slow_rate if window is not None else 0.0,
            "calls": window.calls if window is not None else 0,
            "consecutive_failures": self._consecutive,
            "open_for": self.open_for,
            "seconds_until_half_open": until_half_open,
            "half_open_permits_in_use": len(self._trials),
            "half_open_successes": self._trial_successes,
            "trips": self._trips,
            "trip_reason": self._last_trip or None,
            "opened_at": opened or None,
        }

    # -- the attempt path ----------------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit for one attempt, or None when the breaker rejects it (open, forced open,
        or every half-open trial permit taken). The caller counts rejections."""
        if self._state is _S.CLOSED:
            return self._permit  # the common case: nothing is due while closed
        now = self._clock.now()
        self._poll(now)
        state: BreakerState = self._state  # _poll may have moved it (open → half-open)
        if state is _S.CLOSED or state is _S.FORCED_CLOSED or state is _S.DISABLED:
            return self._permit
        if state is _S.FORCED_OPEN:
            return None
        if state is _S.HALF_OPEN and len(self._trials) + self._trial_successes < (
            self._policy.half_open_calls
        ):
            token = self._next_token
            self._next_token += 1
            self._trials[token] = now
            return Permit(self._generation, token)
        if self._policy.mode == "observe":
            return Permit(self._generation, records=False, shadow=True)
        return None

    def admits(self) -> bool:
        """Whether `acquire` would grant a permit now; takes none. Failover asks it before
        sending a request on to the next target, so a hop is never made to a refusal."""
        self._poll(self._clock.now())
        state = self._state
        if state is _S.CLOSED or state is _S.FORCED_CLOSED or state is _S.DISABLED:
            return True
        if state is _S.FORCED_OPEN:
            return False
        if state is _S.HALF_OPEN and len(self._trials) + self._trial_successes < (
            self._policy.half_open_calls
        ):
            return True
        return self._policy.mode == "observe"

    def record(self, permit: Permit, outcome: Attempt) -> None:
        """Record a finished attempt: failures are connect-failure, reset, timeout and
        `failure_statuses`; slow when `duration ≥ slow_calls.duration`. Outcomes of an
        earlier generation are dropped."""
        if not permit.records:
            return
        failed = self._is_failure(outcome)
        slow = self._is_slow(outcome)
        if (
            self._state is _S.CLOSED
            and not failed
            and not slow
            and permit.generation == self._generation
        ):
            # The common case: a success while closed (nothing is due while closed). It
            # can trip the breaker only through a window that holds failures or slow
            # calls (a success may bring the window to its `min_calls`).
            self._consecutive = 0
            window = self._window
            if window is not None and window.record(False, False):
                reason = self._trip_reason()
                if reason is not None:
                    self._open(self._clock.now(), reason, retrip=False)
            return
        now = self._clock.now()
        self._poll(now)
        if permit.generation != self._generation:
            return
        state = self._state
        if state is _S.HALF_OPEN:
            if self._trials.pop(permit.token, None) is None:
                return
            if failed or slow:  # a slow trial has not shown the upstream recovered
                self._note_retry_after(now, outcome, failed)
                self._open(now, "half-open-failed", retrip=True)
                return
            self._trial_successes += 1
            self._maybe_close_half_open()
            return
        if state is not _S.CLOSED and state is not _S.FORCED_CLOSED:
            return
        if self._window is not None:
            self._window.record(failed, slow)
        if failed:
            self._consecutive += 1
            self._note_retry_after(now, outcome, failed)
        else:
            self._consecutive = 0
        if state is _S.FORCED_CLOSED:
            return
        if failed and outcome.retry_after is not None:
            return  # a server-directed failure is counted but never trips by itself
        reason = self._trip_reason()
        if reason is not None:
            self._open(now, reason, retrip=False)

    def release(self, permit: Permit) -> None:
        """Return a permit whose attempt was cancelled: nothing is recorded, and a
        half-open trial permit becomes available again."""
        if not permit.trial:
            return
        self._poll(self._clock.now())
        if permit.generation == self._generation:
            self._trials.pop(permit.token, None)

    def poll(self) -> None:
        """Apply the transitions time has made due (hold over, trial overdue)."""
        self._poll(self._clock.now())

    def trip_from_peer(self, until_wall: float, wall_now: float) -> bool:
        """Open because another sidecar's breaker for this (route, upstream) tripped, until
        `until_wall` (epoch seconds, capped at now + open_for_max); then run our own
        half-open trials. Only from closed or half_open: an open breaker keeps its own
        hold, and forced or disabled breakers are left alone. Not counted as
        a re-trip (open_for does not double). Emits reason "peer", which is never
        re-published. Returns whether the breaker opened."""
        now = self._clock.now()
        self._poll(now)
        if self._operator:
            return False
        if self._state is not _S.CLOSED and self._state is not _S.HALF_OPEN:
            return False
        hold = until_wall - wall_now
        if not math.isfinite(hold) or hold <= 0:
            return False
        self._opened_at = now
        self._peer_until = now + min(hold, max(self._policy.open_for, self._policy.open_for_max))
        self._transition(_S.OPEN, "peer")
        return True

    # -- operators and reloads -----------------------------------------------------------

    def force(self, state: BreakerState | str) -> None:
        """Hold the breaker in forced_open, forced_closed or disabled until `reset`."""
        self._force(BreakerState(state), "operator")

    def _force(self, target: BreakerState, reason: str) -> None:
        if target not in _FORCEABLE:
            raise ValueError(f"cannot force a breaker to {target.value!r}")
        self._operator = True
        if self._state is not target:
            self._transition(target, reason)

    def reset(self) -> None:
        """Back to closed (or disabled under `mode: disabled`): clears the window, the
        consecutive count, the open_for doubling and any server-requested hold."""
        self._operator = False
        target = _S.DISABLED if self._policy.mode == "disabled" else _S.CLOSED
        if self._state is not target:
            self._transition(target, "operator")
        else:
            self._clear()

    def update_policy(self, policy: BreakerPolicy) -> None:
        """Apply a reloaded policy to the live state: thresholds and open periods at once;
        the window is replaced (emptied) only when its kind or size changed."""
        self._policy = policy
        shape = shape_of(policy)
        if shape != self._shape:
            self._shape = shape
            self._window = make_window(shape, self._clock) if shape is not None else None
        if self._operator:
            return
        if policy.mode == "disabled" and self._state is not _S.DISABLED:
            self._transition(_S.DISABLED, "config")
        elif policy.mode != "disabled" and self._state is _S.DISABLED:
            self._transition(_S.CLOSED, "config")
        elif self._state is _S.HALF_OPEN:
            self._maybe_close_half_open()

    # -- persistence ---------------------------------------------------------------------

    def to_dict(self, wall_now: float) -> dict[str, object]:
        """The state worth keeping across a restart, times as wall-clock epoch seconds."""
        offset = wall_now - self._clock.now()
        data: dict[str, object] = {
            "route": self.route,
            "upstream": self.upstream,
            "state": self._state.value,
            "forced": self._operator,
            "open_doublings": self._doublings,
            "open_for": self.open_for,
        }
        if self._state is _S.OPEN or self._state is _S.HALF_OPEN:
            data["opened_at"] = self._opened_at + offset
            data["hold_until"] = self._hold_until() + offset
        if self._retry_after_until is not None:
            data["retry_after_until"] = self._retry_after_until + offset
        return data

    def restore(self, data: Mapping[str, object], wall_now: float) -> None:
        """Restore what `to_dict` saved. An open (or half-open) breaker comes back open for
        what is left of its hold (if nothing is left, its next call starts a half-open
        period); forced states come back as they were; `mode: disabled` in the current
        policy wins over a saved automatic state. Raises ValueError on a malformed entry."""
        try:
            state = BreakerState(str(data["state"]))
            forced = data.get("forced", False)
            doublings = _as_int(data.get("open_doublings", 0))
            opened_wall = _as_float(data["opened_at"]) if "opened_at" in data else None
            ra_wall = _as_float(data["retry_after_until"]) if "retry_after_until" in data else None
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(
                f"malformed breaker state for {self.route}/{self.upstream}: {exc}"
            ) from None
        if not isinstance(forced, bool) or not 0 <= doublings <= _MAX_DOUBLINGS:
            raise ValueError(f"malformed breaker state for {self.route}/{self.upstream}")
        to_mono = self._clock.now() - wall_now
        if forced or state is _S.FORCED_OPEN or state is _S.FORCED_CLOSED:
            if state in _FORCEABLE:
                self._force(state, "restored")
            return
        if state not in (_S.OPEN, _S.HALF_OPEN) or self._operator:
            return
        if self._state not in (_S.CLOSED, _S.OPEN, _S.HALF_OPEN):
            return  # `mode: disabled` in the current policy wins
        if opened_wall is None:
            raise ValueError(f"breaker state for {self.route}/{self.upstream} lacks opened_at")
        self._doublings = doublings
        self._opened_at = opened_wall + to_mono
        self._peer_until = None
        self._retry_after_until = ra_wall + to_mono if ra_wall is not None else None
        if self._state is not _S.OPEN:
            self._transition(_S.OPEN, "restored")

    # -- internals -----------------------------------------------------------------------

    def _is_failure(self, outcome: Attempt) -> bool:
        if outcome.result in (
            AttemptResult.CONNECT_FAILURE,
            AttemptResult.RESET,
            AttemptResult.TIMEOUT,
        ):
            return True
        return outcome.status is not None and outcome.status in self._policy.failure_statuses

    def _is_slow(self, outcome: Attempt) -> bool:
        slow = self._policy.slow_calls
        return slow is not None and outcome.duration >= slow.duration

    def _trip_reason(self) -> str | None:
        """Why a closed breaker should open now, or None."""
        policy = self._policy
        limit = policy.consecutive_failures
        if limit is not None and self._consecutive >= limit:
            return "consecutive-failures"
        window = self._window
        if window is None:
            return None
        rate = policy.failure_rate
        min_calls = (rate or _DEFAULT_RATE).min_calls
        if window.calls < min_calls:
            return None
        if rate is not None and window.failure_rate >= rate.threshold:
            return "failure-rate"
        slow = policy.slow_calls
        if slow is not None and window.slow_rate >= slow.threshold:
            return "slow-call-rate"
        return None

    def _note_retry_after(self, now: float, outcome: Attempt, failed: bool) -> None:
        if failed and outcome.retry_after is not None:
            until = now + outcome.retry_after
            if self._retry_after_until is None or until > self._retry_after_until:
                self._retry_after_until = until

    def _maybe_close_half_open(self) -> None:
        if not self._trials and self._trial_successes >= self._policy.half_open_calls:
            self._transition(_S.CLOSED, "half-open-succeeded")

    def _open(self, at: float, reason: str, *, retrip: bool) -> None:
        if (
            retrip
            and self._doublings < _MAX_DOUBLINGS
            and self.open_for < self._policy.open_for_max
        ):
            self._doublings += 1
        self._opened_at = at
        self._peer_until = None
        self._transition(_S.OPEN, reason)

    def _poll(self, now: float) -> None:
        # Each pass makes at most one transition; a long quiet spell can owe two (a trial
        # overdue, then that open period over as well).
        for _ in range(4):
            if self._state is _S.OPEN:
                hold = self._hold_until()
                if now < hold:
                    return
                self._transition(_S.HALF_OPEN, "open-expired")
            elif self._state is _S.HALF_OPEN and self._trials:
                due = min(self._trials.values()) + self._policy.half_open_max_wait
                if now < due:
                    return
                self._open(due, "half-open-timeout", retrip=True)
            else:
                return

    def _clear(self) -> None:
        if self._window is not None:
            self._window.reset()
        self._consecutive = 0
        self._doublings = 0
        self._retry_after_until = None

    def _shared_permit(self) -> Permit:
        # One immutable permit per generation serves every closed/disabled attempt: the
        # happy path allocates nothing.
        return Permit(self._generation, records=self._state is not _S.DISABLED)

    def _transition(self, to: BreakerState, reason: str) -> None:
        """The one place the state changes: checks legality, starts a new generation,
        sets up the new state and emits exactly one `BreakerTransitioned`."""
        frm = self._state
        if to not in TRANSITIONS[frm]:
            raise RuntimeError(f"illegal breaker transition {frm.value} -> {to.value}")
        self._state = to
        self._generation += 1
        self._trials.clear()
        self._trial_successes = 0
        if to is not _S.OPEN:
            self._peer_until = None
        if to is _S.CLOSED:
            self._clear()
        elif to is _S.OPEN:
            self._consecutive = 0
            if reason != "restored":
                self._trips += 1
            self._last_trip = reason
        elif to is _S.FORCED_OPEN:
            self._opened_at = self._clock.now()
            self._last_trip = reason
        if to is _S.OPEN or to is _S.FORCED_OPEN:
            self._opened_wall = self._opened_at + (self._clock.wall() - self._clock.now())
        self._permit = self._shared_permit()
        if self._emit is not None:
            self._emit(
                BreakerTransitioned(
                    route=self.route,
                    upstream=self.upstream,
                    from_state=frm.value,
                    to_state=to.value,
                    reason=reason,
                    # The hold in force: open_for, or longer when the server asked so.
                    open_for=self._hold_until() - self._opened_at if to is _S.OPEN else 0.0,
                )
            )


def _as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value

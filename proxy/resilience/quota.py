"""Provider quotas (DESIGN §14): what an upstream's response says about its remaining quota,
and the per-partition bookkeeping that decides whether the next request may go out.

Both halves are pure and synchronous. The adapters read one response (status, headers and,
for the few responses that need it, a small body already in memory) and never raise:
missing or malformed values just mean "this response told us nothing". The tracker keeps,
per credential partition and quota resource, the last known remaining count and the reset
instant (monotonic seconds), plus the GitHub secondary-limit pause; time is passed in.

    adapter(status, headers, body, wall_now) → QuotaReading
    QuotaTracker.observe(partition, reading, now)      after each response
    QuotaTracker.admit(partition, resource, now) → 0.0 (send) or seconds until the reset
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from multidict import MultiMapping

from proxy.resilience.backoff import parse_retry_after, seconds_until_http_date

__all__ = [
    "ADAPTERS",
    "QuotaReading",
    "QuotaTracker",
    "QuotaWindow",
    "RESET_MARGIN",
    "github_resource",
    "needs_body",
]

SECONDARY_PAUSE = 60.0  # GitHub: "wait at least one minute" without retry-after
SECONDARY_PAUSE_MAX = 900.0  # 15 minutes
EPOCH_THRESHOLD = 1e9  # generic X-RateLimit-Reset: epoch seconds above this, else a delta
MAX_PARTITIONS = 10_000  # partitions tracked per upstream (LRU): memory stays bounded
BODY_LIMIT = 64 * 1024  # bodies larger than this are never inspected
# Added to every reset: epoch and HTTP-date resets have one-second resolution and our
# timers may fire a hair early, and a request that lands just before the reset is refused.
RESET_MARGIN = 0.1


@dataclass(frozen=True, slots=True)
class QuotaReading:
    """What one response said. None everywhere: it said nothing about quota.

    `reset_after` and `retry_after` are seconds from now. `secondary` marks a GitHub
    secondary rate limit; `estimated_time` a Hugging Face model still loading (503).
    """

    remaining: int | None = None
    limit: int | None = None
    reset_after: float | None = None
    resource: str = ""
    retry_after: float | None = None
    secondary: bool = False
    estimated_time: float | None = None
    refused: bool = False  # the upstream refused this request for quota (403/420/429)

    @property
    def empty(self) -> bool:
        return (
            self.remaining is None
            and self.retry_after is None
            and self.estimated_time is None
            and not self.refused
        )


NOTHING = QuotaReading()

Headers = MultiMapping[str]
Adapter = Callable[[int, Headers, bytes | None, float], QuotaReading]


_INTEGER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only (str.isdigit accepts "¹")


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not _INTEGER.fullmatch(text):
        return None
    return max(0, int(text))


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _retry_after(headers: Headers, wall_now: float) -> float | None:
    value = headers.get("Retry-After")
    return parse_retry_after(value, wall_now) if value is not None else None


def _json_body(body: bytes | None) -> dict[str, object] | None:
    if not body or len(body) > BODY_LIMIT:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _after_epoch(epoch: float | None, wall_now: float) -> float | None:
    return None if epoch is None else max(0.0, epoch - wall_now)


# --- GitHub --------------------------------------------------------------------------------

_SECONDARY = re.compile(r"secondary rate limit|abuse detection", re.IGNORECASE)


def read_github(status: int, headers: Headers, body: bytes | None, wall_now: float) -> QuotaReading:
    """`x-ratelimit-limit/remaining/used/reset` (reset: epoch seconds) per
    `x-ratelimit-resource`. A 403 or 429 whose message mentions a secondary rate limit, or
    that carries `retry-after`, is a secondary limit (GitHub REST docs, "Rate limits")."""
    remaining = _int(headers.get("x-ratelimit-remaining"))
    limit = _int(headers.get("x-ratelimit-limit"))
    if remaining is None and limit is not None:
        used = _int(headers.get("x-ratelimit-used"))
        if used is not None:
            remaining = max(0, limit - used)
    reset = _after_epoch(_float(headers.get("x-ratelimit-reset")), wall_now)
    resource = (headers.get("x-ratelimit-resource") or "").strip().lower()[:64]
    retry_after = _retry_after(headers, wall_now)
    secondary = False
    refused = False
    if status in (403, 429):
        data = _json_body(body)
        message = data.get("message") if data is not None else None
        mentions = isinstance(message, str) and _SECONDARY.search(message) is not None
        if mentions or retry_after is not None:
            secondary = True
            refused = True
        elif remaining == 0:
            refused = True  # the primary limit: "API rate limit exceeded"
    return QuotaReading(remaining, limit, reset, resource, retry_after, secondary, None, refused)


def github_resource(path: str) -> str:
    """The GitHub quota resource a request will count against, from its path (GitHub docs:
    search, code_search and graphql have their own limits; the rest is `core`)."""
    if path.startswith("/search/code"):
        return "code_search"
    if path.startswith("/search/"):
        return "search"
    if path.startswith("/graphql"):
        return "graphql"
    return "core"


# --- Cloudinary ----------------------------------------------------------------------------


def _http_date(value: str | None, wall_now: float) -> float | None:
    if value is None or not value.strip():
        return None
    return seconds_until_http_date(value.strip(), wall_now)


def read_cloudinary(
    status: int, headers: Headers, body: bytes | None, wall_now: float
) -> QuotaReading:
    """Admin API: `X-FeatureRateLimit-Limit/Remaining/Reset`, the reset an HTTP-date;
    exhausted requests are answered 420 (or 429)."""
    remaining = _int(headers.get("X-FeatureRateLimit-Remaining"))
    limit = _int(headers.get("X-FeatureRateLimit-Limit"))
    reset = _http_date(headers.get("X-FeatureRateLimit-Reset"), wall_now)
    retry_after = _retry_after(headers, wall_now)
    refused = status in (420, 429)
    if refused and remaining is None:
        remaining = 0
    return QuotaReading(remaining, limit, reset, "", retry_after, False, None, refused)


# --- IETF RateLimit fields (and Hugging Face) ----------------------------------------------

_PARAM = re.compile(r"(?:^|;)\s*([a-z*][a-z0-9_.*-]*)=([^;,]*)")
_OLD_FORM = re.compile(r"(?:^|,)\s*(limit|remaining|reset)\s*=\s*([0-9]+)")


def _structured_items(value: str) -> list[dict[str, str]]:
    """The parameters of each member of an RFC 8941 list (`"api";r=0;t=55, ...`)."""
    return [
        {key: raw.strip() for key, raw in _PARAM.findall(member.strip())}
        for member in value.split(",")
    ]


def _ietf(headers: Headers) -> tuple[int | None, int | None, float | None]:
    """(remaining, limit, reset_after) from `RateLimit` / `RateLimit-Policy` (draft-ietf-
    httpapi-ratelimit-headers), else the earlier drafts' `RateLimit-Remaining/-Reset/-Limit`
    or `RateLimit: limit=100, remaining=50, reset=30`. With several policies the most
    restrictive (lowest remaining) wins."""
    best: tuple[int, float | None] | None = None
    old: dict[str, str] = {}
    for value in headers.getall("RateLimit", ()):
        for params in _structured_items(value):
            remaining = _int(params.get("r"))
            if remaining is None:
                continue
            reset = _float(params.get("t"))
            if best is None or remaining < best[0]:
                best = (remaining, reset)
        old.update(_OLD_FORM.findall(value))
    limit = None
    policy = headers.get("RateLimit-Policy")
    if policy is not None:
        quotas = [q for q in (_int(p.get("q")) for p in _structured_items(policy)) if q is not None]
        limit = min(quotas) if quotas else None
    if best is not None:
        return best[0], limit, best[1]
    if "remaining" in old:
        return _int(old["remaining"]), _int(old.get("limit")), _float(old.get("reset"))
    remaining = _int(headers.get("RateLimit-Remaining"))
    if limit is None:
        limit = _int((headers.get("RateLimit-Limit") or "").split(",")[0])
    return remaining, limit, _float(headers.get("RateLimit-Reset"))


def read_ietf(status: int, headers: Headers, body: bytes | None, wall_now: float) -> QuotaReading:
    remaining, limit, reset = _ietf(headers)
    retry_after = _retry_after(headers, wall_now)
    refused = status == 429
    if refused and remaining is None and retry_after is not None:
        remaining, reset = 0, retry_after
    return QuotaReading(remaining, limit, reset, "", retry_after, False, None, refused)


def read_huggingface(
    status: int, headers: Headers, body: bytes | None, wall_now: float
) -> QuotaReading:
    """The IETF fields (`RateLimit: "api";r=0;t=55`), plus the inference API's 503 with
    `{"error": "Model ... is currently loading", "estimated_time": 20.0}`."""
    reading = read_ietf(status, headers, body, wall_now)
    if status != 503:
        return reading
    data = _json_body(body)
    estimated = data.get("estimated_time") if data is not None else None
    if isinstance(estimated, bool) or not isinstance(estimated, int | float):
        return reading
    if not math.isfinite(estimated) or estimated < 0:
        return reading
    return QuotaReading(
        reading.remaining,
        reading.limit,
        reading.reset_after,
        "",
        reading.retry_after,
        False,
        float(estimated),
        reading.refused,
    )


# --- generic -------------------------------------------------------------------------------


def read_generic(
    status: int, headers: Headers, body: bytes | None, wall_now: float
) -> QuotaReading:
    """`X-RateLimit-Remaining`, `X-RateLimit-Limit`, `X-RateLimit-Reset` (epoch seconds when
    above 10⁹, else delta-seconds) and `Retry-After`."""
    remaining = _int(headers.get("X-RateLimit-Remaining"))
    limit = _int(headers.get("X-RateLimit-Limit"))
    raw = _float(headers.get("X-RateLimit-Reset"))
    reset = None
    if raw is not None:
        reset = _after_epoch(raw, wall_now) if raw > EPOCH_THRESHOLD else raw
    retry_after = _retry_after(headers, wall_now)
    refused = status == 429
    if refused and remaining is None and retry_after is not None:
        remaining, reset = 0, retry_after
    return QuotaReading(remaining, limit, reset, "", retry_after, False, None, refused)


ADAPTERS: dict[str, Adapter] = {
    "github": read_github,
    "cloudinary": read_cloudinary,
    "huggingface": read_huggingface,
    "ietf": read_ietf,
    "generic": read_generic,
}


def needs_body(kind: str, status: int) -> bool:
    """Whether the adapter reads the body of this response (small error answers only)."""
    if kind == "github":
        return status in (403, 429)
    return kind == "huggingface" and status == 503


# --- tracking ------------------------------------------------------------------------------


class QuotaWindow:
    """One (partition, resource): the last known remaining count and its reset instant.

    `remaining` is also decremented locally for each request sent, so that concurrent
    requests cannot overspend what the last response reported.
    """

    __slots__ = ("limit", "remaining", "reset_at")

    def __init__(self) -> None:
        self.remaining: int | None = None
        self.limit: int | None = None
        self.reset_at: float | None = None  # monotonic


class _Partition:
    __slots__ = ("pause_until", "paused_for", "windows")

    def __init__(self) -> None:
        self.windows: dict[str, QuotaWindow] = {}
        self.pause_until = 0.0  # monotonic; the GitHub secondary-limit pause
        self.paused_for = 0.0  # the last pause's length, doubled on a repeat


class QuotaTracker:
    """Quota state of one upstream, per credential partition (an LRU of `MAX_PARTITIONS`).

    A request may go out unless, before the reset, remaining ≤ `reserve`, or its partition
    is paused after a secondary limit. Unknown state (nothing seen yet, or the reset
    passed) admits: the next response tells.
    """

    def __init__(self, reserve: int = 0, max_partitions: int = MAX_PARTITIONS) -> None:
        self.reserve = reserve
        self.max_partitions = max_partitions
        self._partitions: OrderedDict[bytes | None, _Partition] = OrderedDict()

    def _partition(self, key: bytes | None, create: bool) -> _Partition | None:
        part = self._partitions.get(key)
        if part is not None:
            self._partitions.move_to_end(key)
        elif create:
            part = self._partitions[key] = _Partition()
            while len(self._partitions) > self.max_partitions:
                self._partitions.popitem(last=False)
        return part

    def admit(self, partition: bytes | None, resource: str, now: float) -> float:
        """0.0 when a request may be sent now (and counts it), else seconds until it may."""
        part = self._partition(partition, False)
        if part is None:
            return 0.0
        if part.pause_until > now:
            return part.pause_until - now
        window = part.windows.get(resource)
        if window is None or window.remaining is None:
            return 0.0
        if window.reset_at is not None and window.reset_at <= now:
            window.remaining = None  # a new window: unknown until the next response
            window.reset_at = None
            return 0.0
        if window.remaining <= self.reserve:
            if window.reset_at is None:
                return 0.0  # exhausted, but no reset known: never hold a request forever
            return window.reset_at - now
        window.remaining -= 1
        return 0.0

    def peek(self, partition: bytes | None, resource: str, now: float) -> float:
        """What `admit` would answer, without counting a request."""
        part = self._partitions.get(partition)
        if part is None:
            return 0.0
        if part.pause_until > now:
            return part.pause_until - now
        window = part.windows.get(resource)
        if window is None or window.remaining is None or window.reset_at is None:
            return 0.0
        if window.reset_at <= now or window.remaining > self.reserve:
            return 0.0
        return window.reset_at - now

    def observe(
        self, partition: bytes | None, reading: QuotaReading, now: float, resource: str = ""
    ) -> bool:
        """Fold one response in (under its own resource, else `resource`); True when the
        state changed in a way worth publishing."""
        if reading.empty:
            return False
        part = self._partition(partition, True)
        assert part is not None
        changed = False
        if reading.secondary:
            base = reading.retry_after if reading.retry_after is not None else SECONDARY_PAUSE
            repeat = part.paused_for > 0
            length = max(base, min(SECONDARY_PAUSE_MAX, part.paused_for * 2)) if repeat else base
            part.paused_for = length
            part.pause_until = max(part.pause_until, now + length)
            changed = True
        elif not reading.refused and part.paused_for and part.pause_until <= now:
            part.paused_for = 0.0  # a normal answer after the pause: the next one starts at 60s
        if reading.remaining is None and not (reading.refused and reading.retry_after):
            return changed
        resource = reading.resource or resource
        window = part.windows.get(resource)
        if window is None:
            window = part.windows[resource] = QuotaWindow()
        remaining = reading.remaining
        reset_at = None if reading.reset_after is None else now + reading.reset_after + RESET_MARGIN
        if remaining is None:  # refused with only a Retry-After: spent until then
            remaining = 0
            assert reading.retry_after is not None
            reset_at = now + reading.retry_after + RESET_MARGIN
        elif reading.refused and reading.retry_after is not None:
            reset_at = max(reset_at or 0.0, now + reading.retry_after + RESET_MARGIN)
        same_window = (
            window.remaining is not None
            and window.reset_at is not None
            and reset_at is not None
            and abs(reset_at - window.reset_at) < 1.5  # epoch resets have 1s resolution
        )
        if same_window and window.remaining is not None:
            # Within one window remaining only goes down; answers to requests sent before
            # others may report a higher count than our own local accounting.
            remaining = min(remaining, window.remaining)
        if (remaining, reset_at) != (window.remaining, window.reset_at):
            changed = changed or remaining != window.remaining or not same_window
        window.remaining = remaining
        window.reset_at = reset_at
        if reading.limit is not None:
            window.limit = reading.limit
        return changed

    def restore(
        self,
        partition: bytes | None,
        resource: str,
        remaining: int,
        reset_at: float,
        pause_until: float,
        now: float,
    ) -> None:
        """Adopt a snapshot published by another sidecar (only when we know nothing newer)."""
        part = self._partition(partition, True)
        assert part is not None
        if pause_until > now:
            part.pause_until = max(part.pause_until, pause_until)
        if reset_at <= now:
            return
        window = part.windows.get(resource)
        if window is None:
            window = part.windows[resource] = QuotaWindow()
        if window.remaining is None or window.remaining > remaining:
            window.remaining = remaining
            window.reset_at = reset_at

    def snapshot(self, partition: bytes | None, resource: str) -> tuple[int, float, float] | None:
        """(remaining, reset_at, pause_until) of one window, for publishing; None: unknown."""
        part = self._partitions.get(partition)
        if part is None:
            return None
        window = part.windows.get(resource)
        if window is None or window.remaining is None or window.reset_at is None:
            if part.pause_until > 0:
                return (0, 0.0, part.pause_until)
            return None
        return (window.remaining, window.reset_at, part.pause_until)

    def known(self, partition: bytes | None) -> bool:
        return partition in self._partitions

    def summary(self, now: float) -> dict[str, float | int | None]:
        """The most constrained window across partitions: for gauges and /status."""
        remaining: int | None = None
        limit: int | None = None
        reset: float | None = None
        paused = 0.0
        for part in self._partitions.values():
            paused = max(paused, part.pause_until - now)
            for window in part.windows.values():
                if window.remaining is None:
                    continue
                if window.reset_at is not None and window.reset_at <= now:
                    continue
                if remaining is None or window.remaining < remaining:
                    remaining = window.remaining
                    limit = window.limit
                    reset = None if window.reset_at is None else window.reset_at - now
        return {
            "remaining": remaining,
            "limit": limit,
            "reset_seconds": None if reset is None else round(max(0.0, reset), 3),
            "paused_seconds": round(max(0.0, paused), 3),
            "partitions": len(self._partitions),
        }

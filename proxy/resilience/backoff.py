"""How long to wait before a retry: our exponential backoff, and what the server asked for.

Both are pure: randomness comes from the injected `Rng`, the current wall time is passed
in (HTTP dates and `X-RateLimit-Reset` are wall-clock instants).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

from proxy.clock import Rng
from proxy.config.model import BackoffPolicy

__all__ = ["backoff_delay", "parse_retry_after", "server_wait"]


def backoff_delay(policy: BackoffPolicy, retry: int, rng: Rng) -> float:
    """Seconds to wait before retry `retry` (k ≥ 1; retry 1 is the second attempt).

    d = min(max, initial * multiplier^(k-1)); jitter `full` draws uniform[0, d], `equal`
    uniform[d/2, d], `none` waits exactly d. Full jitter spreads synchronized clients
    apart best; equal jitter keeps a floor of half the delay.
    """
    if retry < 1:
        raise ValueError(f"retry must be >= 1, got {retry}")
    try:
        delay = min(policy.max, policy.initial * policy.multiplier ** (retry - 1))
    except OverflowError:  # a huge retry number: the cap applies anyway
        delay = policy.max
    delay = max(0.0, delay)
    if policy.jitter == "full":
        return rng.uniform(0.0, delay)
    if policy.jitter == "equal":
        return rng.uniform(delay / 2.0, delay)
    return delay


def parse_retry_after(value: str, wall_now: float) -> float | None:
    """`Retry-After` as seconds from now (≥ 0): delta-seconds or an HTTP-date; garbage → None.

    Accepts the three HTTP-date forms of RFC 9110 §5.6.7 (IMF-fixdate, RFC 850, asctime,
    the last two read as UTC). A fractional delta such as `1.5`, which some servers send,
    is accepted too.
    """
    text = value.strip()
    if not text:
        return None
    if text[0].isdigit():
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return seconds_until_http_date(text, wall_now)


def seconds_until_http_date(text: str, wall_now: float) -> float | None:
    """Seconds from `wall_now` until an HTTP-date (RFC 9110 §5.6.7), at least 0; None when
    it does not parse."""
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - wall_now)
    except (OverflowError, OSError, ValueError):
        return None


def _rate_limit_reset(status: int, headers: Mapping[str, str], wall_now: float) -> float | None:
    """`X-RateLimit-Reset` (epoch seconds) as seconds from now, only when the limit is spent:
    `X-RateLimit-Remaining: 0`, or the status says so (429, or 403 as GitHub sends)."""
    reset = headers.get("X-RateLimit-Reset")
    if reset is None:
        return None
    remaining = headers.get("X-RateLimit-Remaining")
    spent = remaining is not None and remaining.strip() == "0"
    if not (spent or status in (429, 403)):
        return None
    try:
        epoch = float(reset.strip())
    except ValueError:
        return None
    if not math.isfinite(epoch) or epoch < 0:
        return None
    return max(0.0, epoch - wall_now)


def server_wait(status: int, headers: Mapping[str, str], wall_now: float) -> float | None:
    """The wait the upstream asked for, in seconds from now (≥ 0), or None when it asked none.

    The larger of `Retry-After` (delta-seconds or HTTP-date) and `X-RateLimit-Reset`
    (epoch seconds, counted only with `X-RateLimit-Remaining: 0` or on 429/403); values
    that do not parse are ignored. `headers` must look names up case-insensitively
    (aiohttp's `CIMultiDictProxy` does).
    """
    waits: list[float] = []
    retry_after = headers.get("Retry-After")
    if retry_after is not None:
        parsed = parse_retry_after(retry_after, wall_now)
        if parsed is not None:
            waits.append(parsed)
    reset = _rate_limit_reset(status, headers, wall_now)
    if reset is not None:
        waits.append(reset)
    return max(waits) if waits else None

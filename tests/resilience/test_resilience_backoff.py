"""Backoff formula per jitter mode, and the server-requested wait from response headers."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from proxy.config.model import BackoffPolicy
from proxy.resilience.backoff import backoff_delay, server_wait

NOW = 1_700_000_000.0


class ScriptedRng:
    """Returns low + fraction * (high - low) for each scripted fraction; records the bounds."""

    def __init__(self, *fractions: float) -> None:
        self.fractions = list(fractions)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return low + self.fractions.pop(0) * (high - low)


def test_no_jitter_grows_exponentially_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial=0.5, max=10.0, multiplier=2.0, jitter="none")
    rng = ScriptedRng()
    delays = [backoff_delay(policy, k, rng) for k in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert rng.calls == []


def test_full_jitter_draws_between_zero_and_the_delay() -> None:
    policy = BackoffPolicy(initial=1.0, max=30.0, multiplier=3.0, jitter="full")
    rng = ScriptedRng(0.5, 1.0, 0.0)
    assert backoff_delay(policy, 1, rng) == 0.5
    assert backoff_delay(policy, 3, rng) == 9.0
    assert backoff_delay(policy, 5, rng) == 0.0
    assert rng.calls == [(0.0, 1.0), (0.0, 9.0), (0.0, 30.0)]


def test_equal_jitter_keeps_half_the_delay_as_a_floor() -> None:
    policy = BackoffPolicy(initial=2.0, max=10.0, multiplier=2.0, jitter="equal")
    rng = ScriptedRng(0.0, 1.0)
    assert backoff_delay(policy, 2, rng) == 2.0
    assert backoff_delay(policy, 2, rng) == 4.0
    assert rng.calls == [(2.0, 4.0), (2.0, 4.0)]


def test_a_huge_retry_number_is_capped_not_an_overflow() -> None:
    policy = BackoffPolicy(initial=0.5, max=10.0, multiplier=2.0, jitter="none")
    assert backoff_delay(policy, 100_000, ScriptedRng()) == 10.0


def test_retry_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(BackoffPolicy(), 0, ScriptedRng())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (formatdate(NOW + 30, usegmt=True), 30.0),  # IMF-fixdate
        (formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: no wait, not negative
        ("Tuesday, 14-Nov-23 22:14:20 GMT", 60.0),  # RFC 850 form
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime form, read as UTC
        ("soon", None),
        ("-5", None),
        ("", None),
        ("12abc", None),
    ],
)
def test_retry_after_delta_seconds_and_http_dates(value: str, expected: float | None) -> None:
    wait = server_wait(503, CIMultiDict({"Retry-After": value}), NOW)
    if expected is None:
        assert wait is None
    else:
        assert wait == pytest.approx(expected)


def test_no_headers_means_no_server_wait() -> None:
    assert server_wait(503, CIMultiDict(), NOW) is None


def test_rate_limit_reset_counts_only_when_the_limit_is_spent() -> None:
    reset = str(int(NOW + 45))
    spent = CIMultiDict({"X-RateLimit-Reset": reset, "X-RateLimit-Remaining": "0"})
    left = CIMultiDict({"X-RateLimit-Reset": reset, "X-RateLimit-Remaining": "12"})
    silent = CIMultiDict({"X-RateLimit-Reset": reset})
    assert server_wait(200, spent, NOW) == pytest.approx(45.0)
    assert server_wait(503, left, NOW) is None
    assert server_wait(503, silent, NOW) is None
    # 429 and GitHub's 403 say the limit is spent whatever Remaining says.
    assert server_wait(429, left, NOW) == pytest.approx(45.0)
    assert server_wait(403, silent, NOW) == pytest.approx(45.0)


def test_rate_limit_reset_in_the_past_or_garbage() -> None:
    past = CIMultiDict({"X-RateLimit-Reset": str(int(NOW - 100))})
    garbage = CIMultiDict({"X-RateLimit-Reset": "tomorrow"})
    assert server_wait(429, past, NOW) == 0.0
    assert server_wait(429, garbage, NOW) is None


def test_the_larger_of_both_waits_wins_and_names_are_case_insensitive() -> None:
    headers = CIMultiDict(
        {"retry-after": "10", "x-ratelimit-reset": str(int(NOW + 60)), "x-ratelimit-remaining": "0"}
    )
    assert server_wait(429, headers, NOW) == pytest.approx(60.0)
    headers["Retry-After"] = "90"
    assert server_wait(429, headers, NOW) == pytest.approx(90.0)


def test_garbage_retry_after_does_not_hide_a_valid_rate_limit_reset() -> None:
    headers = CIMultiDict({"Retry-After": "later", "X-RateLimit-Reset": str(int(NOW + 5))})
    assert server_wait(429, headers, NOW) == pytest.approx(5.0)

"""Retry budget arithmetic: ratio of requests plus a per-second floor, over a sliding window."""

from __future__ import annotations

from proxy.clock import FakeClock
from proxy.config.model import BudgetPolicy
from proxy.resilience.budget import RetryBudget


def test_the_floor_allows_min_per_second_times_window_without_traffic() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.0, min_per_second=1.0, window=10.0), clock)
    assert [budget.try_acquire() for _ in range(12)] == [True] * 10 + [False] * 2
    assert budget.retries == 10


def test_the_ratio_allows_that_share_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0.0, window=10.0), clock)
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_acquire() for _ in range(30))
    assert granted == 20
    assert budget.allowance() == 20.0


def test_float_rounding_does_not_cost_a_retry() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.1, min_per_second=0.0, window=10.0), FakeClock())
    for _ in range(30):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(5)) == 3


def test_refused_retries_are_not_counted() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.5, min_per_second=0.0, window=10.0), FakeClock())
    budget.record_request()
    budget.record_request()
    assert budget.try_acquire()
    assert not budget.try_acquire()
    assert not budget.try_acquire()
    assert budget.retries == 1
    budget.record_request()
    budget.record_request()
    assert budget.try_acquire()  # 2 retries <= 0.5 * 4


def test_counts_leave_the_window_second_by_second() -> None:
    clock = FakeClock(start=1000.0)
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_per_second=0.0, window=3.0), clock)
    budget.record_request()  # second 1000
    clock.advance(1.0)
    budget.record_request()  # second 1001
    assert budget.try_acquire()  # retry in 1001
    assert (budget.requests, budget.retries) == (2, 1)
    clock.advance(2.0)  # second 1003: 1000 left the 3-second window
    assert (budget.requests, budget.retries) == (1, 1)
    assert not budget.try_acquire()
    clock.advance(1.0)  # second 1004: 1001 left too
    assert (budget.requests, budget.retries) == (0, 0)
    clock.advance(1000.0)  # a long silence clears everything at once
    assert (budget.requests, budget.retries) == (0, 0)


def test_a_fully_failing_high_rate_route_retries_about_ratio_of_its_requests() -> None:
    """100 requests/s, every attempt fails, each request wants 2 retries (max_attempts 3)."""
    clock = FakeClock()
    policy = BudgetPolicy(ratio=0.2, min_per_second=1.0, window=10.0)
    budget = RetryBudget(policy, clock)
    requests = retries = 0
    for _ in range(600):  # one minute in 100 ms steps
        for _ in range(10):
            budget.record_request()
            requests += 1
            for _ in range(2):
                if not budget.try_acquire():
                    break
                retries += 1
        clock.advance(0.1)
    # Steady state: retries ≈ ratio * requests + min_per_second per second of traffic.
    expected = (0.2 * 100 + 1.0) / 100
    assert abs(retries / requests - expected) < 0.01
    assert budget.retries <= 0.2 * budget.requests + 10


def test_update_policy_keeps_counts_unless_the_window_size_changes() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.1, min_per_second=0.0, window=10.0), clock)
    for _ in range(10):
        budget.record_request()
    assert budget.try_acquire()
    assert not budget.try_acquire()
    budget.update_policy(BudgetPolicy(ratio=0.5, min_per_second=0.0, window=10.0))
    assert budget.requests == 10
    assert sum(budget.try_acquire() for _ in range(10)) == 4  # 5 allowed, 1 already spent
    budget.update_policy(BudgetPolicy(ratio=0.5, min_per_second=0.0, window=20.0))
    assert (budget.requests, budget.retries) == (0, 0)

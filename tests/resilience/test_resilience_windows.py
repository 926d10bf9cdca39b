"""Sliding windows subtract what they evict: by whole seconds, or by the oldest call."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.clock import FakeClock
from proxy.config.model import BreakerPolicy, FailureRatePolicy, SlowCallPolicy
from proxy.resilience.windows import CountWindow, TimeWindow, shape_of


def test_time_window_counts_and_rates() -> None:
    window = TimeWindow(10, FakeClock())
    assert (window.calls, window.failure_rate, window.slow_rate) == (0, 0.0, 0.0)
    window.record(failed=True, slow=False)
    window.record(failed=False, slow=True)
    window.record(failed=True, slow=True)
    window.record(failed=False, slow=False)
    assert (window.calls, window.failures, window.slow_calls) == (4, 2, 2)
    assert window.failure_rate == 0.5
    assert window.slow_rate == 0.5


def test_time_window_evicts_whole_seconds() -> None:
    clock = FakeClock(start=1000.0)
    window = TimeWindow(10, clock)
    window.record(failed=True, slow=False)  # second 1000
    clock.advance(4.5)
    window.record(failed=False, slow=False)  # second 1004
    clock.advance(5.4)  # 1009.9: still inside
    assert (window.calls, window.failures) == (2, 1)
    clock.advance(0.1)  # second 1010: the bucket of 1000 is reused, its counts subtracted
    assert (window.calls, window.failures) == (1, 0)
    window.record(failed=True, slow=True)
    assert (window.calls, window.failures, window.slow_calls) == (2, 1, 1)
    clock.advance(4.0)  # second 1014: 1004 left
    assert (window.calls, window.failures) == (1, 1)
    clock.advance(3600.0)
    assert (window.calls, window.failures, window.slow_calls) == (0, 0, 0)


def test_time_window_reset() -> None:
    window = TimeWindow(5, FakeClock())
    window.record(failed=True, slow=True)
    window.reset()
    assert (window.calls, window.failures, window.slow_calls) == (0, 0, 0)


def test_count_window_keeps_the_last_n_calls() -> None:
    window = CountWindow(3)
    window.record(failed=True, slow=True)
    window.record(failed=True, slow=False)
    assert (window.calls, window.failures, window.slow_calls) == (2, 2, 1)
    window.record(failed=False, slow=False)
    assert window.failure_rate == pytest.approx(2 / 3)
    window.record(failed=False, slow=False)  # evicts the first (failed, slow) call
    assert (window.calls, window.failures, window.slow_calls) == (3, 1, 0)
    window.record(failed=False, slow=True)
    window.record(failed=False, slow=False)
    assert (window.calls, window.failures, window.slow_calls) == (3, 0, 1)
    window.reset()
    assert (window.calls, window.failure_rate) == (0, 0.0)


def test_windows_refuse_a_zero_size() -> None:
    with pytest.raises(ValueError):
        CountWindow(0)
    with pytest.raises(ValueError):
        TimeWindow(0, FakeClock())


def test_window_shape_follows_the_policy() -> None:
    base = BreakerPolicy()
    assert shape_of(base) == ("time", 60)
    assert shape_of(replace(base, failure_rate=FailureRatePolicy(window=2.5))) == ("time", 3)
    counted = FailureRatePolicy(window=None, window_calls=100)
    assert shape_of(replace(base, failure_rate=counted)) == ("count", 100)
    assert shape_of(replace(base, failure_rate=None)) is None
    slow_only = replace(base, failure_rate=None, slow_calls=SlowCallPolicy(5.0, 0.8))
    assert shape_of(slow_only) == ("time", 60)

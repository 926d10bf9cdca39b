"""Token buckets on a fake clock (DESIGN §14): over any interval T a bucket admits at most
burst + rps × T, and per-caller buckets are bounded."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resilience.ratelimit import CallerBuckets, TokenBucket


@settings(max_examples=200, deadline=None)
@given(
    rps=st.floats(min_value=0.1, max_value=1000),
    burst=st.integers(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=300),
)
def test_any_interval_admits_at_most_burst_plus_rps_times_its_length(rps, burst, gaps):
    bucket = TokenBucket(rps, burst, 0.0)
    now = 0.0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        if bucket.take(now) == 0.0:
            admitted.append(now)
    # every window [admitted[i], admitted[j]] holds j - i + 1 admissions
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            span = admitted[j] - admitted[i]
            assert j - i + 1 <= burst + rps * span + 1e-6


def test_a_refusal_says_when_the_next_token_is_there():
    bucket = TokenBucket(rps=2.0, burst=1.0, now=0.0)
    assert bucket.take(0.0) == 0.0
    wait = bucket.take(0.0)
    assert math.isclose(wait, 0.5)
    assert bucket.take(0.25) > 0
    assert bucket.take(0.5) == 0.0


def test_a_quiet_bucket_refills_to_burst_only():
    bucket = TokenBucket(rps=10.0, burst=3.0, now=0.0)
    for _ in range(3):
        assert bucket.take(0.0) == 0.0
    admitted = sum(1 for _ in range(10) if bucket.take(1000.0) == 0.0)
    assert admitted == 3


def test_callers_have_their_own_buckets_and_are_bounded():
    buckets = CallerBuckets(rps=1.0, burst=1.0, max_callers=100)
    assert buckets.take("alice", 0.0) == 0.0
    assert buckets.take("alice", 0.0) > 0
    assert buckets.take("bob", 0.0) == 0.0  # another caller is unaffected
    for i in range(1000):
        buckets.take(f"caller-{i}", 0.0)
    assert len(buckets) == 100


def test_lower_limits_apply_to_existing_buckets():
    buckets = CallerBuckets(rps=100.0, burst=100.0, max_callers=10)
    buckets.take("a", 0.0)
    buckets.update(rps=1.0, burst=2.0, max_callers=1)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert len(buckets) == 1

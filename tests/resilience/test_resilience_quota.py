"""Quota adapters on header sets written from each provider's documentation, and the
tracker on a fake clock (DESIGN §14). Adapters never raise: malformed values read as unknown."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.resilience.quota import (
    ADAPTERS,
    RESET_MARGIN,
    QuotaReading,
    QuotaTracker,
    github_resource,
    needs_body,
    read_cloudinary,
    read_generic,
    read_github,
    read_huggingface,
    read_ietf,
)

NOW = 1_700_000_000.0  # wall clock, epoch seconds


def h(**items: str) -> CIMultiDict[str]:
    return CIMultiDict((k.replace("_", "-"), v) for k, v in items.items())


# --- GitHub (docs.github.com "Rate limits for the REST API") ---------------------------------


def test_github_primary_headers_per_resource():
    headers = CIMultiDict(
        {
            "x-ratelimit-limit": "5000",
            "x-ratelimit-remaining": "4999",
            "x-ratelimit-used": "1",
            "x-ratelimit-reset": str(int(NOW) + 3600),
            "x-ratelimit-resource": "core",
        }
    )
    reading = read_github(200, headers, None, NOW)
    assert reading == QuotaReading(4999, 5000, 3600.0, "core", None, False, None, False)


def test_github_search_resource_and_remaining_from_used():
    headers = CIMultiDict(
        {
            "x-ratelimit-limit": "30",
            "x-ratelimit-used": "30",
            "x-ratelimit-reset": str(int(NOW) + 42),
            "x-ratelimit-resource": "search",
        }
    )
    reading = read_github(200, headers, None, NOW)
    assert (reading.remaining, reading.limit, reading.reset_after, reading.resource) == (
        0,
        30,
        42.0,
        "search",
    )


def test_github_primary_limit_exceeded_is_a_refusal_not_a_secondary_limit():
    headers = CIMultiDict(
        {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 600)}
    )
    body = json.dumps({"message": "API rate limit exceeded for 203.0.113.7.", "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting"}).encode()
    reading = read_github(403, headers, body, NOW)
    assert reading.refused and not reading.secondary
    assert reading.remaining == 0 and reading.reset_after == 600.0


@pytest.mark.parametrize("status", [403, 429])
def test_github_secondary_limit_by_message(status):
    body = json.dumps({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.", "documentation_url": "https://docs.github.com/free-pro-team@latest/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits"}).encode()
    headers = CIMultiDict({"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "4990", "x-ratelimit-reset": str(int(NOW) + 3000)})
    reading = read_github(status, headers, body, NOW)
    assert reading.secondary and reading.refused and reading.retry_after is None
    assert reading.remaining == 4990  # the primary quota is not what ran out


def test_github_secondary_limit_by_retry_after_without_a_body():
    reading = read_github(429, CIMultiDict({"retry-after": "30"}), None, NOW)
    assert reading.secondary and reading.retry_after == 30.0


def test_github_a_403_that_is_not_about_rate_limits_is_nothing():
    body = json.dumps({"message": "Resource not accessible by integration"}).encode()
    reading = read_github(403, CIMultiDict({"x-ratelimit-remaining": "4000"}), body, NOW)
    assert not reading.secondary and not reading.refused


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining": "lots", "x-ratelimit-reset": "soon"},
        {"x-ratelimit-remaining": "", "x-ratelimit-reset": ""},
        {"x-ratelimit-remaining": "1e3", "x-ratelimit-reset": "nan"},
        {"x-ratelimit-reset": "-5"},
        {},
    ],
)
def test_github_malformed_values_read_as_unknown(headers):
    reading = read_github(200, CIMultiDict(headers), None, NOW)
    assert reading.remaining is None and reading.reset_after is None
    assert reading.empty


def test_non_ascii_digits_read_as_unknown():
    # found by the property test below: str.isdigit() accepts superscripts that int() refuses
    for value in ("¹", "٣", "²⁰", "1" * 40):
        assert read_generic(200, CIMultiDict({"X-RateLimit-Remaining": value}), None, NOW).remaining is None


def test_github_malformed_body_is_not_a_secondary_limit():
    for body in (b"{not json", b"[]", b'{"message": 5}', b"\xff\xfe", b""):
        assert not read_github(403, CIMultiDict(), body, NOW).secondary


def test_github_resource_from_path():
    assert github_resource("/search/code?q=x") == "code_search"
    assert github_resource("/search/issues?q=x") == "search"
    assert github_resource("/graphql") == "graphql"
    assert github_resource("/repos/o/r/issues") == "core"


# --- Cloudinary (Admin API "Usage limits") --------------------------------------------------


def test_cloudinary_feature_rate_limit_with_an_http_date_reset():
    headers = CIMultiDict(
        {
            "X-FeatureRateLimit-Limit": "500",
            "X-FeatureRateLimit-Remaining": "499",
            "X-FeatureRateLimit-Reset": "Tue, 14 Nov 2023 23:13:20 GMT",  # NOW + 3600
        }
    )
    reading = read_cloudinary(200, headers, None, NOW)
    assert (reading.remaining, reading.limit, reading.reset_after) == (499, 500, 3600.0)


def test_cloudinary_420_when_exhausted():
    headers = CIMultiDict(
        {"X-FeatureRateLimit-Limit": "500", "X-FeatureRateLimit-Reset": "Tue, 14 Nov 2023 22:23:20 GMT"}
    )
    reading = read_cloudinary(420, headers, b'{"error":{"message":"Rate Limit Exceeded"}}', NOW)
    assert reading.refused and reading.remaining == 0 and reading.reset_after == 600.0


def test_cloudinary_malformed_reset():
    headers = CIMultiDict({"X-FeatureRateLimit-Remaining": "3", "X-FeatureRateLimit-Reset": "tomorrow-ish"})
    reading = read_cloudinary(200, headers, None, NOW)
    assert reading.remaining == 3 and reading.reset_after is None


# --- IETF RateLimit fields and Hugging Face -------------------------------------------------


def test_ietf_structured_fields():
    headers = CIMultiDict({"RateLimit-Policy": '"default";q=100;w=60', "RateLimit": '"default";r=50;t=30'})
    assert read_ietf(200, headers, None, NOW) == QuotaReading(50, 100, 30.0)


def test_ietf_several_policies_the_most_restrictive_wins():
    headers = CIMultiDict(
        {"RateLimit-Policy": '"burst";q=100;w=60, "day";q=1000;w=86400', "RateLimit": '"burst";r=80;t=20, "day";r=3;t=7200'}
    )
    reading = read_ietf(200, headers, None, NOW)
    assert (reading.remaining, reading.limit, reading.reset_after) == (3, 100, 7200.0)


def test_ietf_earlier_drafts():
    separate = CIMultiDict({"RateLimit-Limit": "100", "RateLimit-Remaining": "7", "RateLimit-Reset": "12"})
    assert read_ietf(200, separate, None, NOW) == QuotaReading(7, 100, 12.0)
    combined = CIMultiDict({"RateLimit": "limit=100, remaining=80, reset=54"})
    assert read_ietf(200, combined, None, NOW) == QuotaReading(80, 100, 54.0)


def test_ietf_429_with_retry_after_only():
    reading = read_ietf(429, CIMultiDict({"Retry-After": "9"}), None, NOW)
    assert reading.refused and reading.remaining == 0 and reading.reset_after == 9.0


@pytest.mark.parametrize(
    "value", ['"api";r=;t=5', '"api";r=-;t=x', "garbage", "", '"api";t=5', ";;;,,,", '"api";r=abc']
)
def test_ietf_malformed_fields_never_raise(value):
    reading = read_ietf(200, CIMultiDict({"RateLimit": value}), None, NOW)
    assert reading.remaining is None


def test_huggingface_hub_rate_limit_headers():
    headers = CIMultiDict(
        {"RateLimit": '"api";r=0;t=55', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
    )
    reading = read_huggingface(429, headers, None, NOW)
    assert (reading.remaining, reading.limit, reading.reset_after, reading.refused) == (0, 500, 55.0, True)


def test_huggingface_model_loading_503():
    body = json.dumps({"error": "Model gpt2 is currently loading", "estimated_time": 20.5}).encode()
    reading = read_huggingface(503, CIMultiDict({"content-type": "application/json"}), body, NOW)
    assert reading.estimated_time == 20.5
    assert not reading.empty


@pytest.mark.parametrize(
    "body", [b'{"estimated_time": "soon"}', b'{"estimated_time": -1}', b'{"estimated_time": true}', b"oops", None, b'{"estimated_time": 1e999}']
)
def test_huggingface_malformed_503_bodies(body):
    assert read_huggingface(503, CIMultiDict(), body, NOW).estimated_time is None


# --- generic --------------------------------------------------------------------------------


def test_generic_epoch_and_delta_resets():
    epoch = CIMultiDict({"X-RateLimit-Remaining": "4", "X-RateLimit-Limit": "10", "X-RateLimit-Reset": str(int(NOW) + 90)})
    assert read_generic(200, epoch, None, NOW) == QuotaReading(4, 10, 90.0)
    delta = CIMultiDict({"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "90"})
    assert read_generic(200, delta, None, NOW).reset_after == 90.0


def test_generic_retry_after_as_http_date_on_429():
    headers = CIMultiDict({"Retry-After": "Tue, 14 Nov 2023 22:14:20 GMT"})  # NOW + 60
    reading = read_generic(429, headers, None, NOW)
    assert reading.refused and reading.remaining == 0 and reading.reset_after == 60.0


@given(
    st.dictionaries(
        st.sampled_from(
            ["X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Limit", "Retry-After", "RateLimit", "RateLimit-Policy", "x-ratelimit-used", "X-FeatureRateLimit-Reset", "X-FeatureRateLimit-Remaining"]
        ),
        st.text(max_size=40),
    ),
    st.sampled_from([200, 403, 420, 429, 503]),
    st.binary(max_size=80),
)
def test_no_adapter_ever_raises(headers, status, body):
    for adapter in ADAPTERS.values():
        adapter(status, CIMultiDict(headers), body, NOW)


def test_only_error_answers_need_a_body():
    assert needs_body("github", 403) and needs_body("github", 429) and not needs_body("github", 200)
    assert needs_body("huggingface", 503) and not needs_body("generic", 503)


# --- the tracker ----------------------------------------------------------------------------


def test_holds_requests_at_the_reserve_until_the_reset():
    tracker = QuotaTracker(reserve=1)
    now = 100.0
    tracker.observe(None, QuotaReading(remaining=3, reset_after=60.0), now)
    assert tracker.admit(None, "", now) == 0.0  # 3 → 2 (counted locally)
    assert tracker.admit(None, "", now) == 0.0  # 2 → 1
    # at the reserve: held until the reset (plus a margin for one-second resolutions)
    assert tracker.admit(None, "", now) == pytest.approx(60.0 + RESET_MARGIN)
    assert tracker.admit(None, "", now + 30) == pytest.approx(30.0 + RESET_MARGIN)
    assert tracker.admit(None, "", now + 60) > 0
    assert tracker.admit(None, "", now + 60 + RESET_MARGIN) == 0.0  # reset: unknown, admitted


def test_answers_to_earlier_requests_never_raise_remaining_within_a_window():
    tracker = QuotaTracker()
    tracker.observe(None, QuotaReading(remaining=2, reset_after=60.0), 0.0)
    assert tracker.admit(None, "", 0.0) == 0.0
    assert tracker.admit(None, "", 0.0) == 0.0
    # the first request's answer still says 1 left: our local count (0) wins
    tracker.observe(None, QuotaReading(remaining=1, reset_after=60.0), 0.1)
    assert tracker.admit(None, "", 0.2) > 0
    # a new window (a later reset) is believed
    tracker.observe(None, QuotaReading(remaining=5000, reset_after=3600.0), 61.0)
    assert tracker.admit(None, "", 61.0) == 0.0


def test_exhausted_without_a_reset_never_holds_a_request_forever():
    tracker = QuotaTracker()
    tracker.observe(None, QuotaReading(remaining=0), 0.0)
    assert tracker.admit(None, "", 0.0) == 0.0


def test_partitions_and_resources_are_separate():
    tracker = QuotaTracker()
    alice, bob = b"a" * 32, b"b" * 32
    tracker.observe(alice, QuotaReading(remaining=0, reset_after=60.0, resource="core"), 0.0)
    assert tracker.admit(alice, "core", 1.0) > 0
    assert tracker.admit(alice, "search", 1.0) == 0.0
    assert tracker.admit(bob, "core", 1.0) == 0.0
    assert tracker.admit(None, "core", 1.0) == 0.0


def test_secondary_limit_pauses_the_partition_60s_without_retry_after_doubling_to_15_minutes():
    tracker = QuotaTracker()
    part, other = b"p" * 32, b"q" * 32
    now = 0.0
    expected = [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    for pause in expected:
        tracker.observe(part, QuotaReading(remaining=4000, secondary=True, refused=True), now)
        assert tracker.admit(part, "core", now) == pytest.approx(pause)
        assert tracker.admit(part, "search", now) == pytest.approx(pause)  # the whole partition
        assert tracker.admit(other, "core", now) == 0.0  # not the whole upstream
        assert tracker.admit(part, "core", now + pause - 0.001) > 0
        now += pause
        assert tracker.admit(part, "core", now) == 0.0
    # a normal answer after the pause: the next secondary limit starts from 60 s again
    tracker.observe(part, QuotaReading(remaining=3999), now)
    tracker.observe(part, QuotaReading(secondary=True, refused=True), now)
    assert tracker.admit(part, "core", now) == pytest.approx(60.0)


def test_secondary_limit_honours_retry_after():
    tracker = QuotaTracker()
    tracker.observe(None, QuotaReading(retry_after=30.0, secondary=True, refused=True), 0.0)
    assert tracker.admit(None, "core", 0.0) == pytest.approx(30.0)


def test_partitions_are_bounded():
    tracker = QuotaTracker(max_partitions=3)
    for i in range(10):
        tracker.observe(bytes([i]) * 32, QuotaReading(remaining=0, reset_after=60.0), 0.0)
    assert tracker.summary(0.0)["partitions"] == 3
    assert tracker.admit(bytes([0]) * 32, "", 1.0) == 0.0  # evicted: unknown again
    assert tracker.admit(bytes([9]) * 32, "", 1.0) > 0


def test_summary_reports_the_most_constrained_window():
    tracker = QuotaTracker()
    tracker.observe(b"a" * 32, QuotaReading(remaining=10, limit=60, reset_after=100.0), 0.0)
    tracker.observe(b"b" * 32, QuotaReading(remaining=2, limit=60, reset_after=50.0), 0.0)
    summary = tracker.summary(10.0)
    assert summary["remaining"] == 2 and summary["limit"] == 60 and summary["reset_seconds"] == 40.0 + RESET_MARGIN
    assert tracker.summary(60.0)["remaining"] == 10  # b's window reset: unknown again


def test_restore_adopts_a_published_exhaustion():
    tracker = QuotaTracker()
    tracker.restore(None, "core", 0, 500.0, 0.0, 100.0)
    assert tracker.admit(None, "core", 100.0) == pytest.approx(400.0)
    tracker.restore(None, "search", 0, 50.0, 0.0, 100.0)  # already reset: ignored
    assert tracker.admit(None, "search", 100.0) == 0.0

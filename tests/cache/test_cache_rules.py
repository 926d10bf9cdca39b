"""The pure RFC 9111 / RFC 5861 rules: directive parsing, dates, ages and refusals."""

from __future__ import annotations

import math

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache import rules
from proxy.cache.rules import Refusal
from proxy.config.model import FallbackPolicy


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_rfc9111_5_2_directives_are_case_insensitive_and_span_field_lines() -> None:
    d = rules.parse_directives(["Max-Age=60, PRIVATE", "must-revalidate"])
    assert d == {"max-age": "60", "private": None, "must-revalidate": None}


def test_rfc9111_5_2_quoted_values_may_hold_commas() -> None:
    d = rules.parse_directives(['no-cache="Set-Cookie, X-User", max-age=5'])
    assert d == {"no-cache": "Set-Cookie, X-User", "max-age": "5"}


def test_rfc9111_4_2_1_first_occurrence_of_a_repeated_directive_wins() -> None:
    assert rules.parse_directives(["max-age=10", "max-age=99"])["max-age"] == "10"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("0", 0),
        ("120", 120),
        ("99999999999", 2_147_483_648),
        ("-1", None),
        ("1.5", None),
        ("", None),
        (None, None),
        ("١٢", None),
    ],
)
def test_rfc9111_1_2_2_delta_seconds(arg: str | None, expected: int | None) -> None:
    assert rules.delta_seconds(arg) == expected


@pytest.mark.parametrize(
    "value",
    ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],
)
def test_rfc9110_5_6_7_all_three_date_formats(value: str) -> None:
    assert rules.parse_http_date(value) == 784111777.0


def test_rfc9110_5_6_7_invalid_date_is_none() -> None:
    assert rules.parse_http_date("0") is None
    assert rules.parse_http_date("yesterday") is None


def test_response_directives_parse_qualified_and_invalid_values() -> None:
    cc = rules.response_directives(
        hdrs(("cache-control", 'no-cache="Set-Cookie", private="X-User", max-age=abc'))
    )
    assert not cc.no_cache and cc.no_cache_fields == {"set-cookie"}
    assert not cc.private and cc.private_fields == {"x-user"}
    assert cc.max_age == 0  # invalid: already stale


def test_rfc5861_4_stale_if_error_parsed_and_invalid_means_zero() -> None:
    def sie(value: str) -> int | None:
        return rules.response_directives(hdrs(("cache-control", value))).stale_if_error

    assert sie("stale-if-error=300") == 300
    assert sie("stale-if-error=x") == 0
    assert sie("max-age=5") is None


def test_rfc9111_5_2_1_2_max_stale_without_value_accepts_any_staleness() -> None:
    assert rules.request_directives(hdrs(("cache-control", "max-stale"))).max_stale == math.inf
    assert rules.request_directives(hdrs(("cache-control", "max-stale=30"))).max_stale == 30


def test_pragma_no_cache_counts_only_without_cache_control() -> None:
    assert rules.request_directives(hdrs(("pragma", "no-cache"))).no_cache
    assert not rules.request_directives(
        hdrs(("pragma", "no-cache"), ("cache-control", "max-stale"))
    ).no_cache


def test_rfc9111_4_2_1_lifetime_precedence() -> None:
    both = rules.response_directives(hdrs(("cache-control", "max-age=100, s-maxage=10")))
    assert rules.freshness_lifetime(both, shared=True, date_value=0, expires=None) == 10
    assert rules.freshness_lifetime(both, shared=False, date_value=0, expires=None) == 100
    none = rules.NO_RESPONSE_DIRECTIVES
    date = 784111777.0
    expires = "Sun, 06 Nov 1994 08:50:37 GMT"
    assert rules.freshness_lifetime(none, shared=True, date_value=date, expires=expires) == 60
    assert rules.freshness_lifetime(none, shared=True, date_value=date, expires="0") == 0
    assert rules.freshness_lifetime(none, shared=True, date_value=date, expires=None) == 0


def test_rfc9111_4_2_3_corrected_initial_age() -> None:
    def age(age_value: float, date_value: float, delay: float) -> float:
        return rules.initial_age(
            age_value=age_value, date_value=date_value, response_time=150, response_delay=delay
        )

    assert age(5, 100, 2) == 50  # apparent age (response_time - date) wins
    assert age(80, 100, 2) == 82  # age_value + response delay wins when larger
    assert age(0, 200, 0) == 0  # a Date in the future never makes the age negative


def test_rfc9111_5_1_age_uses_first_member_and_ignores_invalid() -> None:
    assert rules.parse_age(["30, 60"]) == 30
    assert rules.parse_age(["-3"]) == 0
    assert rules.parse_age([]) == 0


def test_rfc5861_4_max_staleness_is_the_smaller_limit() -> None:
    policy = FallbackPolicy(stale_if_error=600)
    cc = rules.response_directives(hdrs(("cache-control", "stale-if-error=60")))
    assert rules.max_staleness(cc, policy) == 60
    assert rules.max_staleness(rules.NO_RESPONSE_DIRECTIVES, policy) == 600
    big = rules.response_directives(hdrs(("cache-control", "stale-if-error=6000")))
    assert rules.max_staleness(big, policy) == 600


def test_refuse_to_serve_reports_request_reasons_in_order() -> None:
    policy = FallbackPolicy()
    cc = rules.NO_RESPONSE_DIRECTIVES

    def why(request: rules.RequestDirectives, stale_for: float = 10) -> Refusal | None:
        return rules.refuse_to_serve(
            stale_for=stale_for, cc=cc, request=request, policy=policy, shared=True
        )

    assert why(rules.RequestDirectives()) is None
    assert why(rules.RequestDirectives(no_cache=True)) is Refusal.REQUEST_NO_CACHE
    assert why(rules.RequestDirectives(no_store=True)) is Refusal.REQUEST_NO_STORE
    assert why(rules.RequestDirectives(max_stale=5)) is Refusal.MAX_STALE
    assert why(rules.RequestDirectives(max_stale=10)) is None
    assert why(rules.RequestDirectives(), stale_for=3601) is Refusal.TOO_STALE


def test_rfc7230_6_1_storable_headers_drop_hop_by_hop_and_connection_named() -> None:
    headers = hdrs(
        ("Content-Type", "text/plain"),
        ("Connection", "close, X-Trace"),
        ("X-Trace", "abc"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Age", "12"),
        ("ETag", '"v1"'),
    )
    assert rules.storable_headers(headers) == (("Content-Type", "text/plain"), ("ETag", '"v1"'))

"""Key parts: Accept-Encoding normalisation, Vary, partitions."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.key import (
    body_digest,
    normalise_accept_encoding,
    parse_vary,
    partition_of,
    vary_values,
)


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_accept_encoding_order_case_and_spaces_do_not_matter() -> None:
    assert normalise_accept_encoding(["gzip, br"]) == normalise_accept_encoding(["BR,gzip"])
    assert normalise_accept_encoding(["gzip", "br"]) == normalise_accept_encoding(["br, gzip"])


def test_accept_encoding_keeps_q_values_and_identity_apart() -> None:
    assert normalise_accept_encoding(["gzip; q=0.5"]) == "gzip;q=0.5"
    assert normalise_accept_encoding(["gzip;q=0.5"]) != normalise_accept_encoding(["gzip"])
    assert normalise_accept_encoding(["gzip"]) != normalise_accept_encoding(["identity"])
    # absent (anything acceptable) differs from empty (identity only), RFC 9110 §12.5.3
    assert normalise_accept_encoding([]) is None
    assert normalise_accept_encoding([""]) == ""


def test_rfc9111_4_1_vary_names_are_normalised_and_star_detected() -> None:
    assert parse_vary(["Accept-Language, accept-language", "X-Tenant"]) == (
        "accept-language",
        "x-tenant",
    )
    assert parse_vary(["Accept, *"]) == ("*",)
    assert parse_vary([]) == ()


def test_rfc9111_4_1_vary_values_trimmed_and_absent_differs_from_empty() -> None:
    names = ("accept-language", "x-tenant")
    assert vary_values(names, hdrs(("Accept-Language", "  en "))) == ("en", None)
    assert vary_values(names, hdrs(("x-tenant", ""))) == (None, "")
    assert vary_values(
        ("accept",), hdrs(("accept", "text/html"), ("accept", " application/json"))
    ) == ("text/html, application/json",)


def test_partition_absent_without_credentials() -> None:
    assert partition_of(b"k", hdrs(("accept", "*/*")), ()) is None


def test_partition_depends_on_each_credential_header_and_the_secret() -> None:
    a = partition_of(b"k", hdrs(("Authorization", "Bearer a")), ())
    b = partition_of(b"k", hdrs(("Authorization", "Bearer b")), ())
    assert a is not None and b is not None and a != b
    assert partition_of(b"k", hdrs(("authorization", "Bearer a")), ()) == a
    assert partition_of(b"other", hdrs(("Authorization", "Bearer a")), ()) != a
    cookie = partition_of(b"k", hdrs(("Cookie", "Bearer a")), ())
    assert cookie is not None and cookie != a  # the header's name is part of it
    assert b"Bearer" not in a  # never the credential in clear


def test_partition_includes_identity_headers_only_when_configured() -> None:
    h1 = hdrs(("X-User", "alice"))
    h2 = hdrs(("X-User", "bob"))
    assert partition_of(b"k", h1, ()) is None
    assert partition_of(b"k", h1, ("x-user",)) != partition_of(b"k", h2, ("x-user",))


def test_body_digest_is_sha256_hex() -> None:
    assert body_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

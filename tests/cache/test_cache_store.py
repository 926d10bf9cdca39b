"""The fallback store end to end: keys, storing while streaming, stale-if-error serving,
partitions, LRU bounds and reloads. Virtual time only (FakeClock)."""

from __future__ import annotations

import email.utils
from collections.abc import Sequence

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache import FallbackStore, StaleHit, body_digest, cache_status_value
from proxy.cache.key import RequestKey
from proxy.cache.store import ENTRY_OVERHEAD
from proxy.clock import FakeClock
from proxy.config.model import CacheSettings, FallbackPolicy

Pairs = Sequence[tuple[str, str]]
POLICY = FallbackPolicy(stale_if_error=3600.0)
URL = "https://api.example/v1/items?page=2"


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def fields(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Response header fields as the upstream client hands them over: bytes, in order."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


class Harness:
    def __init__(self, max_bytes: int = 1 << 20, max_entry_bytes: int = 1 << 16) -> None:
        self.clock = FakeClock()
        self.store = FallbackStore(
            CacheSettings(max_bytes=max_bytes, max_entry_bytes=max_entry_bytes),
            self.clock,
            secret=b"test-secret",
        )

    def key(
        self,
        *,
        url: str = URL,
        method: str = "GET",
        request: Pairs = (),
        policy: FallbackPolicy = POLICY,
        body_hash: str | None = None,
        injects: bool = False,
        route: str = "api",
    ) -> RequestKey:
        return self.store.request_key(
            route=route,
            method=method,
            url=url,
            headers=hdrs(*request),
            policy=policy,
            body_hash=body_hash,
            upstream_injects_credentials=injects,
        )

    def put(
        self,
        key: RequestKey,
        *,
        status: int = 200,
        response: Pairs = (("Cache-Control", "max-age=60"),),
        body: bytes = b"payload",
        request: Pairs = (),
        policy: FallbackPolicy = POLICY,
    ) -> bool:
        writer = self.store.begin(
            key,
            status=status,
            fields=fields(*response),
            request_headers=hdrs(*request),
            policy=policy,
        )
        if writer is None:
            return False
        for i in range(0, len(body), 3):
            writer.feed(body[i : i + 3])
        return writer.finish()

    def get(
        self, key: RequestKey, *, request: Pairs = (), policy: FallbackPolicy = POLICY
    ) -> StaleHit | None:
        return self.store.lookup(key, hdrs(*request), policy)


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- storing and the basic round trip ---------------------------------------------------------


def test_stored_response_is_served_with_status_headers_and_body(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Content-Type", "application/json"),), body=b'{"a": 1}')
    hit = h.get(key)
    assert hit is not None
    assert hit.status == 200
    assert hit.body == b'{"a": 1}'
    assert ("Content-Type", "application/json") in hit.headers
    assert h.store.entries == 1 and h.store.bytes > len(b'{"a": 1}')


def test_nothing_stored_means_no_hit(h: Harness) -> None:
    assert h.get(h.key()) is None


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_rfc9110_15_1_heuristically_cacheable_statuses_are_stored(h: Harness, status: int) -> None:
    key = h.key()
    assert h.put(key, status=status, body=b"" if status == 204 else b"x")
    hit = h.get(key)
    assert hit is not None and hit.status == status


@pytest.mark.parametrize("status", [201, 202, 206, 302, 304, 307, 400, 401, 429, 500, 503])
def test_rfc9110_15_1_other_statuses_are_never_stored(h: Harness, status: int) -> None:
    key = h.key()
    assert not h.put(key, status=status)
    assert h.get(key) is None and h.store.entries == 0


def test_methods_outside_fallback_methods_are_not_stored(h: Harness) -> None:
    key = h.key(method="POST", body_hash=body_digest(b"{}"))
    assert not h.put(key)


def test_rfc9111_5_2_2_5_no_store_response_is_never_stored(h: Harness) -> None:
    key = h.key()
    assert not h.put(key, response=(("Cache-Control", "max-age=60, no-store"),))
    assert h.store.entries == 0


def test_rfc9111_5_2_1_5_no_store_request_is_never_stored(h: Harness) -> None:
    key = h.key()
    assert not h.put(key, request=(("Cache-Control", "no-store"),))


def test_rfc9111_4_1_vary_star_is_never_stored(h: Harness) -> None:
    assert not h.put(h.key(), response=(("Vary", "Accept, *"),))


def test_set_cookie_responses_are_stored_only_with_store_set_cookie(h: Harness) -> None:
    key = h.key()
    response = (("Set-Cookie", "sid=1"), ("Cache-Control", "max-age=60"))
    assert not h.put(key, response=response)
    opted_in = FallbackPolicy(store_set_cookie=True)
    assert h.put(key, response=response, policy=opted_in)
    hit = h.get(key, policy=opted_in)
    assert hit is not None and ("Set-Cookie", "sid=1") in hit.headers


def test_stored_headers_exclude_hop_by_hop_and_age(h: Harness) -> None:
    key = h.key()
    response = (
        ("Cache-Control", "max-age=60"),
        ("Connection", "X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Age", "3"),
        ("X-Kept", "yes"),
    )
    assert h.put(key, response=response)
    hit = h.get(key)
    assert hit is not None
    assert hit.headers == (("Cache-Control", "max-age=60"), ("X-Kept", "yes"))


def test_rfc9111_5_2_2_4_qualified_no_cache_fields_are_not_kept(h: Harness) -> None:
    key = h.key()
    response = (("Cache-Control", 'max-age=5, no-cache="X-Token"'), ("X-Token", "t"))
    assert h.put(key, response=response)
    hit = h.get(key)
    assert hit is not None and all(name != "X-Token" for name, _ in hit.headers)


# -- streaming writer ------------------------------------------------------------------------


def test_body_is_assembled_from_streamed_chunks(h: Harness) -> None:
    key = h.key()
    writer = h.store.begin(key, status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    for chunk in (b"ab", bytearray(b"cd"), b"", b"ef"):
        writer.feed(chunk)
    assert writer.finish()
    hit = h.get(key)
    assert hit is not None and hit.body == b"abcdef"


def test_writer_aborted_mid_stream_never_stores(h: Harness) -> None:
    key = h.key()
    writer = h.store.begin(key, status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(b"first half")
    writer.abort()
    assert not writer.finish()  # a late finish after abort changes nothing
    assert h.get(key) is None and h.store.entries == 0


def test_writer_never_finished_never_stores(h: Harness) -> None:
    key = h.key()
    writer = h.store.begin(key, status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(b"partial")
    assert h.get(key) is None


def test_body_shorter_than_content_length_is_incomplete_and_not_stored(h: Harness) -> None:
    key = h.key()
    assert not h.put(key, response=(("Content-Length", "100"),), body=b"only ten!!")
    assert h.put(key, response=(("Content-Length", "10"),), body=b"only ten!!")


def test_head_response_stored_without_body_and_kept_apart_from_get(h: Harness) -> None:
    head = h.key(method="HEAD")
    get = h.key(method="GET")
    assert head != get
    assert h.put(head, response=(("Content-Length", "1234"),), body=b"")
    hit = h.get(head)
    assert hit is not None and hit.body == b"" and ("Content-Length", "1234") in hit.headers
    assert h.get(get) is None


def test_entry_over_max_entry_bytes_stops_copying_and_is_not_stored() -> None:
    h = Harness(max_entry_bytes=10)
    key = h.key()
    writer = h.store.begin(key, status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(b"123456")
    assert not writer.too_big
    writer.feed(b"789012")
    writer.feed(b"more")
    assert writer.too_big
    assert not writer.finish()
    assert h.store.entries == 0
    assert h.put(key, body=b"1234567890")  # exactly the limit fits


def test_content_length_over_max_entry_bytes_is_refused_before_any_copy() -> None:
    h = Harness(max_entry_bytes=10)
    writer = h.store.begin(
        h.key(),
        status=200,
        fields=fields(("Content-Length", "11")),
        request_headers=hdrs(),
        policy=POLICY,
    )
    assert writer is None


# -- keys -----------------------------------------------------------------------------------


def test_key_includes_the_full_url_with_query(h: Harness) -> None:
    assert h.put(h.key(url="https://api.example/v1/items?page=1"))
    assert h.get(h.key(url="https://api.example/v1/items?page=2")) is None
    assert h.get(h.key(url="https://api.example/v1/items?page=1")) is not None


def test_rfc9111_4_1_vary_selects_by_the_request_header_values(h: Harness) -> None:
    response = (("Vary", "Accept-Language"), ("Cache-Control", "max-age=60"))
    key = h.key()
    assert h.put(key, response=response, body=b"hello", request=(("Accept-Language", "en"),))
    assert h.put(key, response=response, body=b"bonjour", request=(("Accept-Language", "fr"),))
    en = h.get(key, request=(("accept-language", " en "),))
    fr = h.get(key, request=(("Accept-Language", "fr"),))
    assert en is not None and en.body == b"hello"
    assert fr is not None and fr.body == b"bonjour"
    assert h.get(key, request=(("Accept-Language", "de"),)) is None
    assert h.get(key) is None  # absent matches only absent


def test_rfc9111_4_1_newest_vary_replaces_older_variants(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Vary", "X-A"),), request=(("X-A", "1"),), body=b"a")
    assert h.put(key, response=(("Vary", "X-B"),), request=(("X-B", "1"),), body=b"b")
    assert h.store.entries == 1
    assert h.get(key, request=(("X-A", "1"),)) is None
    hit = h.get(key, request=(("X-B", "1"),))
    assert hit is not None and hit.body == b"b"


def test_accept_encoding_is_part_of_the_key(h: Harness) -> None:
    assert h.put(h.key(request=(("Accept-Encoding", "gzip, br"),)), body=b"compressed")
    hit = h.get(h.key(request=(("Accept-Encoding", "BR,gzip"),)))
    assert hit is not None and hit.body == b"compressed"
    assert h.get(h.key(request=(("Accept-Encoding", "identity"),))) is None
    assert h.get(h.key()) is None


def test_opt_in_post_is_keyed_by_body_hash(h: Harness) -> None:
    policy = FallbackPolicy(methods=frozenset(("GET", "HEAD", "POST")))
    a = h.key(method="POST", body_hash=body_digest(b'{"q": "a"}'), policy=policy)
    b = h.key(method="POST", body_hash=body_digest(b'{"q": "b"}'), policy=policy)
    assert h.put(a, body=b"answer a", policy=policy)
    hit = h.get(a, policy=policy)
    assert hit is not None and hit.body == b"answer a"
    assert h.get(b, policy=policy) is None


def test_post_without_body_hash_is_never_stored(h: Harness) -> None:
    policy = FallbackPolicy(methods=frozenset(("GET", "POST")))
    assert not h.put(h.key(method="POST", policy=policy), policy=policy)


def test_route_is_part_of_the_key(h: Harness) -> None:
    assert h.put(h.key(route="a"))
    assert h.get(h.key(route="b")) is None


# -- partitions: shared vs private ----------------------------------------------------------


def test_callers_with_different_authorization_never_see_each_others_entries(h: Harness) -> None:
    alice = h.key(request=(("Authorization", "Bearer alice"),))
    bob = h.key(request=(("Authorization", "Bearer bob"),))
    assert h.put(alice, body=b"alice's data")
    assert h.get(bob) is None
    assert h.get(h.key()) is None  # nor anonymous callers
    hit = h.get(h.key(request=(("Authorization", "Bearer alice"),)))
    assert hit is not None and hit.body == b"alice's data"


def test_cookie_and_identity_headers_partition_too(h: Harness) -> None:
    policy = FallbackPolicy(identity_headers=("x-user",))
    assert h.put(h.key(request=(("Cookie", "sid=1"),)))
    assert h.get(h.key(request=(("Cookie", "sid=2"),))) is None
    assert h.put(h.key(request=(("X-User", "alice"),), policy=policy), policy=policy)
    assert h.get(h.key(request=(("X-User", "bob"),), policy=policy), policy=policy) is None


def test_rfc9111_5_2_2_7_private_is_not_stored_in_the_shared_partition(h: Harness) -> None:
    key = h.key()
    assert key.shared
    assert not h.put(key, response=(("Cache-Control", "private, max-age=60"),))


def test_rfc9111_5_2_2_7_private_is_stored_in_a_credential_partition(h: Harness) -> None:
    key = h.key(request=(("Authorization", "Bearer alice"),))
    assert not key.shared
    assert h.put(key, response=(("Cache-Control", "private, max-age=60"),))
    assert h.get(key) is not None


def test_private_is_stored_when_the_upstream_injects_credentials(h: Harness) -> None:
    key = h.key(injects=True)
    assert key.anonymous and not key.shared
    assert h.put(key, response=(("Cache-Control", "private"),))
    assert h.get(key) is not None
    # the shared regime never sees what was stored under the injecting one
    assert h.get(h.key(injects=False)) is None


def test_rfc9111_5_2_2_7_qualified_private_fields_are_dropped_in_a_shared_cache(
    h: Harness,
) -> None:
    response = (("Cache-Control", 'private="X-User", max-age=60'), ("X-User", "alice"))
    shared = h.key()
    assert h.put(shared, response=response)
    hit = h.get(shared)
    assert hit is not None and all(name != "X-User" for name, _ in hit.headers)
    private = h.key(request=(("Authorization", "Bearer a"),))
    assert h.put(private, response=response)
    hit = h.get(private)
    assert hit is not None and ("X-User", "alice") in hit.headers


# -- freshness, age and staleness ------------------------------------------------------------


def test_rfc9111_4_2_1_max_age_lifetime_then_staleness_grows_with_resident_time(
    h: Harness,
) -> None:
    key = h.key()
    assert h.put(key, response=(("Cache-Control", "max-age=60"),))
    h.clock.advance(59)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 0 and hit.age == 59 and hit.ttl == 1
    h.clock.advance(41)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 40 and hit.age == 100 and hit.ttl == -40


def test_rfc9111_4_2_1_no_explicit_freshness_is_stale_at_once(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=())
    h.clock.advance(5)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 5


def test_rfc9111_4_2_3_age_header_adds_to_current_age(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Cache-Control", "max-age=60"), ("Age", "30")))
    h.clock.advance(40)
    hit = h.get(key)
    assert hit is not None and hit.age == 70 and hit.staleness == 10


def test_rfc9111_4_2_3_date_in_the_past_counts_as_apparent_age(h: Harness) -> None:
    key = h.key()
    date = email.utils.formatdate(h.clock.wall() - 50, usegmt=True)
    assert h.put(key, response=(("Cache-Control", "max-age=60"), ("Date", date)))
    hit = h.get(key)
    assert hit is not None and hit.age == 50 and hit.staleness == 0
    h.clock.advance(20)
    hit = h.get(key)
    assert hit is not None and hit.age == 70 and hit.staleness == 10


def test_rfc9111_4_2_3_date_in_the_future_never_makes_age_negative(h: Harness) -> None:
    key = h.key()
    date = email.utils.formatdate(h.clock.wall() + 500, usegmt=True)
    assert h.put(key, response=(("Date", date),))
    hit = h.get(key)
    assert hit is not None and hit.age == 0 and hit.staleness == 0


def test_rfc9111_4_2_3_response_delay_counts_toward_age(h: Harness) -> None:
    key = h.key()
    sent_at = h.clock.now()
    h.clock.advance(3)
    writer = h.store.begin(
        key,
        status=200,
        fields=fields(("Cache-Control", "max-age=60"), ("Age", "10")),
        request_headers=hdrs(),
        policy=POLICY,
        requested_at=sent_at,
    )
    assert writer is not None and writer.finish()
    hit = h.get(key)
    assert hit is not None and hit.age == 13


def test_rfc9111_4_2_1_expires_minus_date_is_the_lifetime(h: Harness) -> None:
    key = h.key()
    now = h.clock.wall()
    response = (
        ("Date", email.utils.formatdate(now, usegmt=True)),
        ("Expires", email.utils.formatdate(now + 120, usegmt=True)),
    )
    assert h.put(key, response=response)
    h.clock.advance(150)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 30


def test_rfc9111_5_3_invalid_expires_means_already_stale(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Expires", "0"),))
    h.clock.advance(7)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 7


def test_rfc9111_5_2_2_10_s_maxage_is_ignored_by_a_private_cache(h: Harness) -> None:
    key = h.key(request=(("Authorization", "Bearer a"),))
    assert h.put(key, response=(("Cache-Control", "s-maxage=10, max-age=100"),))
    h.clock.advance(50)
    hit = h.get(key)
    assert hit is not None and hit.staleness == 0


# -- serving rules ---------------------------------------------------------------------------


def test_rfc5861_4_served_up_to_stale_if_error_then_dropped() -> None:
    h = Harness()
    policy = FallbackPolicy(stale_if_error=100)
    key = h.key(policy=policy)
    assert h.put(key, response=(("Cache-Control", "max-age=10"),), policy=policy)
    h.clock.advance(110)  # staleness exactly 100: still within
    assert h.get(key, policy=policy) is not None
    h.clock.advance(1)
    assert h.get(key, policy=policy) is None
    assert h.store.entries == 0 and h.store.bytes == 0  # dropped when met


def test_rfc5861_4_the_responses_own_stale_if_error_limits_further(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Cache-Control", "max-age=10, stale-if-error=30"),))
    h.clock.advance(40)
    assert h.get(key) is not None
    h.clock.advance(1)
    assert h.get(key) is None
    assert h.store.entries == 0


def test_rfc9111_5_2_2_2_must_revalidate_is_never_served_stale(h: Harness) -> None:
    key = h.key()
    assert not h.put(key, response=(("Cache-Control", "max-age=10, must-revalidate"),))


def test_rfc9111_5_2_2_4_no_cache_response_is_never_served_stale(h: Harness) -> None:
    key = h.key()
    assert not h.put(key, response=(("Cache-Control", "no-cache"),))


def test_override_revalidate_serves_under_must_revalidate_and_no_cache(h: Harness) -> None:
    override = FallbackPolicy(override_revalidate=True)
    a = h.key(url="https://api.example/a")
    b = h.key(url="https://api.example/b")
    assert h.put(a, response=(("Cache-Control", "must-revalidate"),), policy=override)
    assert h.put(b, response=(("Cache-Control", "no-cache"),), policy=override)
    h.clock.advance(30)
    assert h.get(a, policy=override) is not None
    assert h.get(b, policy=override) is not None
    # reloaded without the override: not served, but kept (the policy may come back)
    assert h.get(a) is None
    assert h.store.entries == 2


def test_rfc9111_5_2_2_10_s_maxage_blocks_stale_in_the_shared_partition(h: Harness) -> None:
    override = FallbackPolicy(override_revalidate=True)
    assert not h.put(h.key(), response=(("Cache-Control", "s-maxage=60"),), policy=override)


def test_rfc9111_5_2_2_8_proxy_revalidate_blocks_only_the_shared_partition(h: Harness) -> None:
    response = (("Cache-Control", "max-age=10, proxy-revalidate"),)
    assert not h.put(h.key(), response=response)
    private = h.key(request=(("Authorization", "Bearer a"),))
    assert h.put(private, response=response)
    h.clock.advance(60)
    assert h.get(private) is not None


@pytest.mark.parametrize(
    "request_headers",
    [
        (("Cache-Control", "no-cache"),),
        (("Cache-Control", "no-store"),),
        (("Pragma", "no-cache"),),
    ],
)
def test_rfc9111_5_2_1_request_no_cache_or_no_store_refuses_stale(
    h: Harness, request_headers: Pairs
) -> None:
    key = h.key()
    assert h.put(key)
    h.clock.advance(100)
    assert h.get(key, request=request_headers) is None
    assert h.store.entries == 1  # the entry stays for other requests
    assert h.get(key) is not None


def test_rfc9111_5_2_1_2_max_stale_bounds_the_staleness(h: Harness) -> None:
    key = h.key()
    assert h.put(key, response=(("Cache-Control", "max-age=60"),))
    h.clock.advance(90)  # 30 s stale
    assert h.get(key, request=(("Cache-Control", "max-stale=29"),)) is None
    assert h.get(key, request=(("Cache-Control", "max-stale=30"),)) is not None
    assert h.get(key, request=(("Cache-Control", "max-stale"),)) is not None
    assert h.store.entries == 1


def test_lookup_refuses_methods_removed_from_fallback_methods(h: Harness) -> None:
    key = h.key()
    assert h.put(key)
    assert h.get(key, policy=FallbackPolicy(methods=frozenset(("HEAD",)))) is None


# -- LRU, accounting, clear, reload ----------------------------------------------------------


def test_lru_stays_within_max_bytes_under_a_stream_of_large_entries() -> None:
    body = b"x" * 1000
    h = Harness(max_bytes=10_000, max_entry_bytes=2_000)
    for i in range(100):
        assert h.put(h.key(url=f"https://api.example/{i}"), body=body)
        assert h.store.bytes <= 10_000
    per_entry = h.store.bytes // h.store.entries
    assert per_entry > len(body)  # headers and overhead are counted too
    assert h.store.entries == 10_000 // per_entry
    assert h.store.evictions == 100 - h.store.entries
    assert h.get(h.key(url="https://api.example/99")) is not None
    assert h.get(h.key(url="https://api.example/0")) is None


def test_lookup_refreshes_recency(h: Harness) -> None:
    h = Harness(max_bytes=3 * (ENTRY_OVERHEAD + 200))
    keys = [h.key(url=f"https://api.example/{i}") for i in range(3)]
    for key in keys:
        assert h.put(key, body=b"y" * 100)
    assert h.store.entries == 3
    assert h.get(keys[0]) is not None  # now most recently used
    assert h.put(h.key(url="https://api.example/new"), body=b"y" * 100)
    assert h.get(keys[0]) is not None
    assert h.get(keys[1]) is None  # the least recently used went
    assert h.store.evictions == 1


def test_replacing_an_entry_does_not_double_count(h: Harness) -> None:
    key = h.key()
    assert h.put(key, body=b"a" * 100)
    size = h.store.bytes
    assert h.put(key, body=b"b" * 100)
    assert h.store.entries == 1 and h.store.bytes == size
    hit = h.get(key)
    assert hit is not None and hit.body == b"b" * 100


def test_entry_larger_than_the_whole_store_is_not_stored() -> None:
    h = Harness(max_bytes=ENTRY_OVERHEAD + 100, max_entry_bytes=1_000)
    assert h.put(h.key(url="https://api.example/small"), body=b"s")
    assert not h.put(h.key(), body=b"z" * 200)
    assert h.store.entries == 1 and h.store.evictions == 0


def test_clear_by_route_and_all(h: Harness) -> None:
    for route in ("a", "a", "b"):
        assert h.put(h.key(route=route, url=f"https://api.example/{h.store.entries}"))
    assert h.store.stats()["per_route"] == {
        "a": {"entries": 2, "bytes": h.store.bytes - _route_bytes(h, "b")},
        "b": {"entries": 1, "bytes": _route_bytes(h, "b")},
    }
    assert h.store.clear("a") == 2
    assert h.store.entries == 1 and h.store.bytes == _route_bytes(h, "b")
    assert h.store.clear("missing") == 0
    assert h.store.clear() == 1
    assert h.store.entries == 0 and h.store.bytes == 0
    assert h.store.stats()["per_route"] == {}
    assert h.store.evictions == 0  # clearing is not eviction


def _route_bytes(h: Harness, route: str) -> int:
    per_route = h.store.stats()["per_route"]
    assert isinstance(per_route, dict)
    return int(per_route[route]["bytes"])


def test_settings_shrink_evicts_least_recently_used() -> None:
    h = Harness(max_bytes=100_000)
    keys = [h.key(url=f"https://api.example/{i}") for i in range(10)]
    for key in keys:
        assert h.put(key, body=b"q" * 500)
    per_entry = h.store.bytes // 10
    h.store.update_settings(CacheSettings(max_bytes=per_entry * 4, max_entry_bytes=1 << 16))
    assert h.store.entries == 4 and h.store.bytes <= per_entry * 4
    assert h.store.evictions == 6
    assert h.get(keys[9]) is not None and h.get(keys[5]) is None
    stats = h.store.stats()
    assert stats["max_bytes"] == per_entry * 4 and stats["entries"] == 4


def test_settings_shrink_of_max_entry_bytes_drops_larger_entries(h: Harness) -> None:
    small, large = h.key(url="https://api.example/s"), h.key(url="https://api.example/l")
    assert h.put(small, body=b"s" * 10)
    assert h.put(large, body=b"l" * 1000)
    h.store.update_settings(CacheSettings(max_bytes=1 << 20, max_entry_bytes=100))
    assert h.get(large) is None and h.get(small) is not None
    assert h.store.evictions == 1


def test_random_secret_per_process_when_none_given() -> None:
    clock = FakeClock()
    one = FallbackStore(CacheSettings(), clock)
    two = FallbackStore(CacheSettings(), clock)
    keys = [
        store.request_key(
            route="r",
            method="GET",
            url=URL,
            headers=hdrs(("Authorization", "Bearer a")),
            policy=POLICY,
            body_hash=None,
            upstream_injects_credentials=False,
        )
        for store in (one, two)
    ]
    assert keys[0].partition is not None and keys[0].partition != keys[1].partition


# -- Cache-Status ----------------------------------------------------------------------------


def test_rfc9211_cache_status_for_a_forwarded_and_failed_request() -> None:
    hit = StaleHit(status=200, headers=(), body=b"", age=130, staleness=70.0, ttl=-70)
    assert (
        cache_status_value(hit, fwd_status=503)
        == "resilience-proxy; fwd=stale; fwd-status=503; ttl=-70; detail=stale-if-error"
    )
    assert cache_status_value(hit) == "resilience-proxy; fwd=stale; ttl=-70; detail=stale-if-error"


def test_rfc9211_cache_status_hit_when_never_forwarded() -> None:
    hit = StaleHit(status=200, headers=(), body=b"", age=5, staleness=0.0, ttl=55)
    assert (
        cache_status_value(hit, forwarded=False)
        == "resilience-proxy; hit; ttl=55; detail=stale-if-error"
    )

"""The per-request fast paths of the fallback store: memoised header parses, interned
anonymous keys, the in-place replacement of a hot entry. Each must give exactly what the
uncached computation gives, stay bounded, and never mix up distinct inputs."""

from __future__ import annotations

import email.utils

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache import FallbackStore, StaleHit, key, rules
from proxy.cache import store as store_module
from proxy.cache.key import RequestKey
from proxy.cache.store import KEY_MEMO_MAX, KEY_MEMO_URL_MAX
from proxy.clock import FakeClock
from proxy.config.model import CacheSettings, FallbackPolicy

POLICY = FallbackPolicy(stale_if_error=3600.0)


def hdrs(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def fields(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Response header fields as the upstream client hands them over: bytes, in order."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


@pytest.fixture(autouse=True)
def empty_memos() -> None:
    rules._response_memo.clear()
    rules._request_memo.clear()
    rules._excluded_memo.clear()
    key._accept_encoding_memo.clear()
    key._vary_memo.clear()


CC_VALUES = (
    "max-age=60",
    "public, max-age=60, stale-if-error=600",
    'no-cache="Set-Cookie, X-Trace", max-age=5',
    'private="X-User", s-maxage=10',
    "must-revalidate, proxy-revalidate, no-store",
    "max-age=abc, stale-if-error=-1",
    "MAX-AGE=7",
)


@pytest.mark.parametrize("value", CC_VALUES)
def test_response_directives_memo_equals_a_fresh_parse(value: str) -> None:
    first = rules.response_directives(hdrs(("Cache-Control", value)))
    second = rules.response_directives(hdrs(("Cache-Control", value)))
    assert first == rules._response_directives([value])
    assert second is first  # the second call is a memo hit
    assert value in rules._response_memo


def test_response_directives_several_field_lines_are_parsed_not_memoised() -> None:
    headers = hdrs(("Cache-Control", "max-age=60"), ("Cache-Control", "max-age=5, private"))
    cc = rules.response_directives(headers)
    assert cc.max_age == 60  # the first occurrence wins across field lines
    assert cc.private
    assert not rules._response_memo


def test_memos_are_bounded_and_skip_long_values() -> None:
    for i in range(rules.MEMO_MAX + 10):
        assert rules.response_directives(hdrs(("Cache-Control", f"max-age={i}"))).max_age == i
        rules.request_directives(hdrs(("Cache-Control", f"max-stale={i}")))
        key.normalise_accept_encoding([f"gzip;q=0.{i}"])
    assert 0 < len(rules._response_memo) <= rules.MEMO_MAX
    assert 0 < len(rules._request_memo) <= rules.MEMO_MAX
    assert 0 < len(key._accept_encoding_memo) <= key._MEMO_MAX
    rules._response_memo.clear()
    long_value = "max-age=1, " + "x" * rules.MEMO_VALUE_MAX
    assert rules.response_directives(hdrs(("Cache-Control", long_value))).max_age == 1
    assert not rules._response_memo


def test_request_directives_memo_equals_a_fresh_parse() -> None:
    for value in ("no-cache", "max-stale", "max-stale=30", "no-store, max-stale=x"):
        first = rules.request_directives(hdrs(("Cache-Control", value)))
        assert first == rules._request_directives([value])
        assert rules.request_directives(hdrs(("cache-control", value))) is first
    assert rules.request_directives(hdrs(("Pragma", "no-cache"))).no_cache


def test_accept_encoding_memo_equals_a_fresh_normalisation() -> None:
    for value in ("gzip, br", "BR,gzip", "gzip; q=0.5", "", "identity"):
        first = key.normalise_accept_encoding([value])
        assert first == key._normalise_accept_encoding([value])
        assert key.normalise_accept_encoding([value]) == first
    assert key.normalise_accept_encoding(["gzip", "br"]) == "br,gzip"


def test_storable_headers_memo_keeps_connection_and_drop_apart() -> None:
    def stored(drop: frozenset[str] = frozenset(), connection: str | None = None) -> list[str]:
        pairs = [("Content-Type", "a/b"), ("X-Trace", "1"), ("X-User", "u"), ("Age", "3")]
        if connection is not None:
            pairs.append(("Connection", connection))
        return [name for name, _ in rules.storable_headers(hdrs(*pairs), drop=drop)]

    for _ in range(2):  # the second round answers from the memo
        assert stored() == ["Content-Type", "X-Trace", "X-User"]
        assert stored(connection="keep-alive") == ["Content-Type", "X-Trace", "X-User"]
        assert stored(connection="X-Trace") == ["Content-Type", "X-User"]
        assert stored(frozenset({"x-user"})) == ["Content-Type", "X-Trace"]
        assert stored(frozenset({"x-user"}), "x-trace") == ["Content-Type"]
    assert len(rules._excluded_memo) == 4  # (no Connection, no drop) needs no memo


def test_request_key_keeps_the_generated_dataclass_semantics() -> None:
    parts = ("r", "GET", "http://u/x", None, True, "gzip", None)
    a = RequestKey(*parts)
    b = RequestKey(
        route="r",
        method="GET",
        url="http://u/x",
        partition=None,
        shared=True,
        accept_encoding="gzip",
        body_hash=None,
    )
    assert a == b and hash(a) == hash(b) == hash(parts)
    assert a != RequestKey("r", "GET", "http://u/x", None, False, "gzip", None)
    assert a != RequestKey("r", "GET", "http://u/x", b"p", True, "gzip", None)
    assert a != parts
    assert repr(a).startswith("RequestKey(route='r', method='GET'")
    with pytest.raises(AttributeError):
        a.url = "other"  # type: ignore[misc]


def _store() -> FallbackStore:
    return FallbackStore(CacheSettings(), FakeClock(), secret=b"test-secret")


def _key(store: FallbackStore, url: str = "http://u/x", *headers: tuple[str, str]) -> RequestKey:
    return store.request_key(
        route="r",
        method="GET",
        url=url,
        headers=hdrs(*headers),
        policy=POLICY,
        body_hash=None,
        upstream_injects_credentials=False,
    )


def test_anonymous_keys_are_interned_credentialed_ones_never() -> None:
    store = _store()
    assert _key(store) is _key(store)
    assert _key(store) is not _key(store, "http://u/x", ("Accept-Encoding", "gzip"))
    assert _key(store).shared and _key(store).partition is None
    mine = _key(store, "http://u/x", ("Authorization", "Bearer a"))
    assert mine == _key(store, "http://u/x", ("Authorization", "Bearer a"))
    assert mine is not _key(store, "http://u/x", ("Authorization", "Bearer a"))
    assert not mine.shared
    injected = store.request_key(
        route="r",
        method="GET",
        url="http://u/x",
        headers=hdrs(),
        policy=POLICY,
        body_hash=None,
        upstream_injects_credentials=True,
    )
    assert not injected.shared and injected != _key(store)


def test_key_memo_is_bounded() -> None:
    store = _store()
    for i in range(KEY_MEMO_MAX + 5):
        _key(store, f"http://u/{i}")
    assert 0 < len(store._keys) <= KEY_MEMO_MAX
    store._keys.clear()
    long_url = "http://u/" + "x" * KEY_MEMO_URL_MAX
    assert _key(store, long_url) == _key(store, long_url)
    assert not store._keys


def test_restoring_the_same_variant_replaces_it_in_place() -> None:
    store = _store()
    k = _key(store)
    sizes = []
    for body in (b"first", b"second, longer", b"3"):
        writer = store.begin(
            _key(store),
            status=200,
            fields=fields(("Cache-Control", "max-age=60")),
            request_headers=hdrs(),
            policy=POLICY,
        )
        assert writer is not None
        writer.feed(body)
        assert writer.finish()
        sizes.append(store.bytes)
    other = _key(store, "http://u/other")
    writer = store.begin(other, status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(b"o")
    assert writer.finish()
    assert store.entries == 2
    assert sizes[0] - sizes[2] == len(b"first") - len(b"3")
    assert store.stats()["per_route"] == {"r": {"entries": 2, "bytes": store.bytes}}
    hit = store.lookup(k, hdrs(), POLICY)
    assert hit is not None and hit.body == b"3"


def test_restoring_the_same_variant_makes_it_the_most_recently_used() -> None:
    store = FallbackStore(
        CacheSettings(max_bytes=3 * (256 + 64) + 200, max_entry_bytes=100),
        FakeClock(),
        secret=b"test-secret",
    )

    def put(url: str) -> None:
        writer = store.begin(
            _key(store, url), status=200, fields=[], request_headers=hdrs(), policy=POLICY
        )
        assert writer is not None
        writer.feed(b"x" * 50)
        assert writer.finish()

    put("http://u/a")
    put("http://u/b")
    put("http://u/a")  # replaced in place: now newer than b
    put("http://u/c")
    put("http://u/d")  # over max_bytes: the least recently used (b) goes first
    assert store.lookup(_key(store, "http://u/b"), hdrs(), POLICY) is None
    assert store.lookup(_key(store, "http://u/a"), hdrs(), POLICY) is not None
    assert store.evictions == 1


# -- per-route keys ------------------------------------------------------------------------


def test_route_keys_equal_request_key_and_share_its_interning() -> None:
    store = _store()
    keys = store.keys_for(
        route="r", url_base="http://u", policy=POLICY, upstream_injects_credentials=False
    )
    for headers in ((), (("Accept-Encoding", "gzip"),), (("Authorization", "Bearer a"),)):
        assert keys.key("GET", "/x", hdrs(*headers), None) == _key(store, "http://u/x", *headers)
    assert keys.key("GET", "/x", hdrs(), None) is _key(store)  # one interned anonymous key
    assert keys.key("HEAD", "/x", hdrs(), None) != _key(store)
    assert keys.key("POST", "/x", hdrs(), "h1") != keys.key("POST", "/x", hdrs(), "h2")


def test_route_keys_partition_by_credentials_and_identity_headers() -> None:
    store = _store()
    policy = FallbackPolicy(identity_headers=("x-user",))
    keys = store.keys_for(
        route="r", url_base="http://u", policy=policy, upstream_injects_credentials=False
    )
    alice = keys.key("GET", "/x", hdrs(("X-User", "alice")), None)
    bob = keys.key("GET", "/x", hdrs(("X-User", "bob")), None)
    anonymous = keys.key("GET", "/x", hdrs(), None)
    assert len({alice, bob, anonymous}) == 3
    assert alice.partition == key.partition_of(
        store._secret, hdrs(("X-User", "alice")), ("x-user",)
    )
    assert not alice.shared and anonymous.shared
    two_lines = hdrs(("Cookie", "a=1"), ("Cookie", "b=2"))
    assert keys.key("GET", "/x", two_lines, None).partition == key.partition_of(
        store._secret, two_lines, ("x-user",)
    )
    injecting = store.keys_for(
        route="r", url_base="http://u", policy=policy, upstream_injects_credentials=True
    )
    private = injecting.key("GET", "/x", hdrs(), None)
    assert private.partition is None and not private.shared and private != anonymous


def test_vary_memo_equals_a_fresh_parse_and_is_bounded() -> None:
    for value in ("Accept-Encoding", "accept, X-Tenant, Accept", "*", "Accept, *", ""):
        first = key.parse_vary([value])
        assert first == key._parse_vary([value])
        assert key.parse_vary([value]) is first
    assert key.parse_vary(["Accept", "X-Tenant"]) == ("accept", "x-tenant")
    for i in range(rules.MEMO_MAX + 10):
        assert key.parse_vary([f"X-{i}"]) == (f"x-{i}",)
    assert 0 < len(key._vary_memo) <= rules.MEMO_MAX


# -- what waits for the first lookup -------------------------------------------------------


def _put(store: FallbackStore, response: tuple[tuple[str, str], ...], body: bytes) -> None:
    writer = store.begin(
        _key(store), status=200, fields=fields(*response), request_headers=hdrs(), policy=POLICY
    )
    assert writer is not None
    writer.feed(body)
    assert writer.finish()


def _entry(store: FallbackStore):  # type: ignore[no-untyped-def]
    (entry,) = store._lru.values()
    return entry


def test_serving_parts_are_derived_once_at_the_first_lookup() -> None:
    clock = FakeClock()
    store = FallbackStore(CacheSettings(), clock, secret=b"test-secret")
    date = email.utils.formatdate(clock.wall() - 30, usegmt=True)
    _put(store, (("Cache-Control", "max-age=60"), ("Date", date), ("Age", "5")), b"x")
    assert _entry(store).served is None  # nothing derived when stored
    clock.advance(10)
    hit = store.lookup(_key(store), hdrs(), POLICY)
    served = _entry(store).served
    assert served is not None and served.lifetime == 60.0
    assert hit is not None and hit.age == 30 + 10  # apparent age beats Age: 5
    assert hit.ttl == 60 - 40 and hit.headers == (("Cache-Control", "max-age=60"), ("Date", date))
    clock.advance(5)
    again = store.lookup(_key(store), hdrs(), POLICY)
    assert _entry(store).served is served  # reused, not derived again
    assert again is not None and again.age == 45


def test_the_same_date_is_parsed_once() -> None:
    date = "Tue, 15 Nov 1994 08:12:31 GMT"
    rules.parse_http_date.cache_clear()
    assert rules.parse_http_date(date) == rules.parse_http_date(date) == 784887151.0
    info = rules.parse_http_date.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_same_size_restore_replaces_in_place_and_serves_the_new_headers() -> None:
    store = _store()
    _put(store, (("Cache-Control", "max-age=60"), ("X-V", "1")), b"aaaa")
    first = store.lookup(_key(store), hdrs(), POLICY)
    size, slots = store.bytes, len(store._lru)
    _put(store, (("Cache-Control", "max-age=60"), ("X-V", "2")), b"bbbb")
    assert store.bytes == size and len(store._lru) == slots == store.entries == 1
    assert store.stats()["per_route"] == {"r": {"entries": 1, "bytes": size}}
    assert _entry(store).served is None  # the replaced entry's derived parts are gone
    hit = store.lookup(_key(store), hdrs(), POLICY)
    assert first is not None and ("X-V", "1") in first.headers and first.body == b"aaaa"
    assert hit is not None and ("X-V", "2") in hit.headers and hit.body == b"bbbb"
    assert "X-V: 2\r\n" in hit.lines and "X-V: 1" not in hit.lines


def test_fields_cache_control_names_are_never_held_even_before_a_lookup() -> None:
    store = _store()
    cc = 'max-age=60, no-cache="X-Token", private="X-User"'
    _put(store, (("Cache-Control", cc), ("X-Token", "t"), ("X-User", "u"), ("X-Ok", "1")), b"x")
    held = [name for name, _ in _entry(store).raw]
    assert held == [b"Cache-Control", b"X-Ok"]  # private= too: this key is in the shared cache


def test_stale_answer_lines_are_the_listeners_stored_head_lines() -> None:
    from proxy.server import handler
    from proxy.server.forwarding import stored_head_lines

    assert handler._STALE_SET == store_module.STALE_ANSWER_FIELDS
    store = _store()
    date = email.utils.formatdate(FakeClock().wall(), usegmt=True)
    response = (
        ("Cache-Control", "max-age=60"),
        ("Content-Type", "a/b"),
        ("Content-Length", "1"),
        ("X-Resilience-Reason", "forged"),
        ("Cache-Status", "forged"),
        ("Connection", "keep-alive"),
        ("Date", date),
    )
    _put(store, response, b"x")
    hit = store.lookup(_key(store), hdrs(), POLICY)
    assert hit is not None
    assert hit.lines == stored_head_lines(hit.headers, handler._STALE_SET)
    assert hit.lines == (f"Cache-Control: max-age=60\r\nContent-Type: a/b\r\nDate: {date}\r\n")
    assert hit.has_date
    head = hit.for_head()
    assert head.lines == hit.lines and head.has_date and head.body == b""
    built = StaleHit(status=200, headers=hit.headers, body=b"", age=0, staleness=0.0, ttl=0)
    assert built.lines == hit.lines and built.has_date
    assert not StaleHit(status=200, headers=(), body=b"", age=0, staleness=0.0, ttl=0).has_date


def test_a_single_chunk_is_kept_by_reference_a_mutable_one_copied() -> None:
    store = _store()
    body = b"x" * 100
    writer = store.begin(_key(store), status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(body)
    assert writer.finish()
    assert _entry(store).body is body
    buffer = bytearray(b"abc")
    writer = store.begin(_key(store), status=200, fields=[], request_headers=hdrs(), policy=POLICY)
    assert writer is not None
    writer.feed(buffer)
    buffer[:] = b"zzz"  # the listener reuses its buffer
    assert writer.finish()
    assert _entry(store).body == b"abc"


def test_stored_fields_are_an_own_copy_of_the_upstreams_list() -> None:
    store = _store()
    received = fields(("Cache-Control", "max-age=60"), ("X-V", "1"))
    writer = store.begin(
        _key(store), status=200, fields=received, request_headers=hdrs(), policy=POLICY
    )
    assert writer is not None
    received.clear()  # the upstream client is done with its list
    writer.feed(b"x")
    assert writer.finish()
    hit = store.lookup(_key(store), hdrs(), POLICY)
    assert hit is not None and hit.headers == (("Cache-Control", "max-age=60"), ("X-V", "1"))


@pytest.mark.parametrize("spelling", ["cache-control", "Cache-Control", "CACHE-CONTROL"])
def test_fields_are_recognised_in_any_spelling_and_the_name_memo_is_bounded(
    spelling: str,
) -> None:
    store = _store()
    refused = ((spelling, "no-store"),)
    writer = store.begin(
        _key(store), status=200, fields=fields(*refused), request_headers=hdrs(), policy=POLICY
    )
    assert writer is None  # no-store seen whatever the spelling
    assert store_module._kind_memo[spelling.encode()] == store_module._CACHE_CONTROL
    for i in range(rules.MEMO_MAX + 5):
        assert (
            store.begin(
                _key(store),
                status=200,
                fields=fields((f"X-{i}", "v"), ("Set-COOKIE", "s=1")),
                request_headers=hdrs(),
                policy=POLICY,
            )
            is None
        )  # Set-Cookie seen among names the memo never saw
    assert 0 < len(store_module._kind_memo) <= rules.MEMO_MAX
    long_name = b"X-" + b"n" * rules.MEMO_VALUE_MAX
    assert store_module._learn_kind(long_name) == 0 and long_name not in store_module._kind_memo

"""The fallback store: last good responses, kept to answer when the upstream fails.

One process-wide store, LRU by bytes within `cache.max_bytes`. The fallback stage builds
one `RouteKeys` per route (`keys_for`) and asks it for a key when a request arrives, calls
`begin` when the final response's headers arrive (then `feed` each body chunk as it streams
to the client and `finish` or `abort`), and `lookup` when the final outcome matches
`fallback.on`. The rules themselves live in `proxy.cache.rules`; keys in `proxy.cache.key`.

Layout: `_variants` maps a base `RequestKey` to the Vary names of its newest stored response
and the entries per Vary values; `_lru` orders every entry by last use. Every operation is a
few dict operations; the body is joined once, at `finish`.

Cost: every good response on a fallback route is stored, and few are ever served, so
storing does only what deciding to store needs: one pass over the upstream's raw fields
(bytes, never decoded as a whole), memoised Cache-Control and Vary parses, and a tuple copy
of the fields. What serving needs (decoded and filtered headers, the answer's head lines,
parsed dates, freshness lifetime and initial age) is derived at an entry's first lookup and
kept with it.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from multidict import CIMultiDict, MultiMapping

from proxy.cache import rules
from proxy.cache.key import (
    CREDENTIAL_HEADERS,
    RequestKey,
    VaryValues,
    normalise_accept_encoding,
    parse_vary,
    partition_for,
    vary_values,
)
from proxy.clock import Clock
from proxy.config.model import CacheSettings, FallbackPolicy
from proxy.headers import HOP_BY_HOP

# Fixed per-entry estimate of the Python objects around body and headers (entry, key, dict
# and LRU slots), bytes; plus 32 bytes per header pair. An estimate, to bound memory.
ENTRY_OVERHEAD = 256
HEADER_OVERHEAD = 32

# Bounds of the anonymous request-key memo (`RouteKeys.key`): keys, URL length.
KEY_MEMO_MAX = 1024
KEY_MEMO_URL_MAX = 1024

# Statuses whose responses never carry a body (RFC 9110 §6.4.1).
_BODYLESS_STATUSES = frozenset((204, 304))
_GET_HEAD = frozenset(("GET", "HEAD"))

# Set by the listener on every stale answer (DESIGN §6 "Response headers added by the
# proxy"), so a stored value of them is never sent; the listener's own `_STALE_SET`.
STALE_ANSWER_FIELDS: frozenset[str] = frozenset(
    ("age", "x-resilience-fallback", "x-resilience-reason", "cache-status", "x-resilience-attempts")
)
# Not in a stale answer's stored lines: those, framing (the listener sets Content-Length
# from the body it sends) and hop-by-hop fields.
_NOT_IN_ANSWER = STALE_ANSWER_FIELDS | HOP_BY_HOP | {"content-length"}

EntryKey = tuple[RequestKey, VaryValues]
Fields = tuple[tuple[bytes, bytes], ...]  # response header fields as received
# (Spelled out here: inside FallbackStore, `bytes` is its gauge property.)
ReceivedFields = Sequence[tuple[bytes, bytes]]


@dataclass(slots=True)
class StaleHit:
    """A stored response to send as the fallback. Headers are as stored: hop-by-hop fields
    and `Age` removed; the caller adds `Age`, `X-Resilience-*` and `Cache-Status`.

    `lines` is the same headers as the answer's head needs them ("Name: value\\r\\n" each),
    without framing and `STALE_ANSWER_FIELDS`, built once per stored entry; `has_date`
    says whether a Date is among them (a stored answer keeps its own Date).
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    age: int  # seconds, RFC 9111 §4.2.3 current_age, truncated: the Age header's value
    staleness: float  # seconds beyond the freshness lifetime, >= 0
    ttl: int  # freshness lifetime - current age, seconds (negative when stale), RFC 9211
    lines: str
    has_date: bool

    # Not frozen, and written out: a hit is built per stale answer, and a frozen __init__
    # (object.__setattr__ per field) costs three times as much. Nothing assigns to a hit.
    def __init__(
        self,
        status: int,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        age: int,
        staleness: float,
        ttl: int,
        lines: str | None = None,
        has_date: bool | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.age = age
        self.staleness = staleness
        self.ttl = ttl
        self.lines = answer_lines(headers) if lines is None else lines
        self.has_date = _has_date(headers) if has_date is None else has_date

    def for_head(self) -> StaleHit:
        """This GET answer as the answer to a HEAD (RFC 9110 §9.3.2): the same headers, no
        body, and the Content-Length the GET carries (that of the stored body). `lines`
        stay: they never hold Content-Length."""
        if self.status in _BODYLESS_STATUSES:
            return replace(self, body=b"")
        headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(self.body))))
        return replace(self, headers=tuple(headers), body=b"")


def answer_lines(headers: tuple[tuple[str, str], ...]) -> str:
    """Stored headers as a stale answer's head lines: without framing, hop-by-hop fields
    and `STALE_ANSWER_FIELDS` (the same as the listener's `stored_head_lines`)."""
    return "".join(
        [f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _NOT_IN_ANSWER]
    )


def _has_date(headers: tuple[tuple[str, str], ...]) -> bool:
    return any(name.lower() == "date" for name, _ in headers)


def cache_status_value(
    hit: StaleHit, *, forwarded: bool = True, fwd_status: int | None = None
) -> str:
    """The `Cache-Status` member (RFC 9211) for a stale-if-error answer.

    forwarded (the request reached the upstream, which failed): `fwd=stale` with the
    upstream's status as `fwd-status` when there was one; not forwarded (breaker open,
    bulkhead full): `hit`. E.g. `resilience-proxy; fwd=stale; fwd-status=503; ttl=-120;
    detail=stale-if-error`.
    """
    if not forwarded:
        return f"resilience-proxy; hit; ttl={hit.ttl}; detail=stale-if-error"
    if fwd_status is None:
        return f"resilience-proxy; fwd=stale; ttl={hit.ttl}; detail=stale-if-error"
    return (
        f"resilience-proxy; fwd=stale; fwd-status={fwd_status}; ttl={hit.ttl}; "
        "detail=stale-if-error"
    )


@dataclass(slots=True, eq=False)
class _Entry:
    """One stored response. Only what deciding to store needs is worked out when it is
    stored (on every good response); what serving needs (the filtered headers, the answer's
    head lines, freshness lifetime and initial age) at its first lookup, in `served`."""

    key: RequestKey
    vary_names: tuple[str, ...]  # the response's Vary, normalised
    vary: VaryValues  # the request's values for those names
    status: int
    # The response's fields as received (bytes, in order); when Cache-Control names fields
    # that must not be stored (`no-cache="…"`, `private="…"` in the shared partition),
    # already without them.
    raw: Fields
    directives: rules.ResponseDirectives
    date: bytes | None  # the first Date field line, unparsed
    expires: bytes | None  # the first Expires field line, unparsed
    age: bytes | None  # the first Age field line, unparsed
    response_time: float  # clock.wall() when the response headers arrived
    response_delay: float  # seconds from sending the final attempt to its headers
    stored_at: float  # clock.now() when the response headers arrived
    head_size: int  # estimate of everything but the body, bytes
    body: bytes = b""
    served: _Served | None = None  # set at the first lookup

    @property
    def size(self) -> int:
        return self.head_size + len(self.body)


@dataclass(frozen=True, slots=True)
class _Served:
    """What serving an entry needs, derived once from what was stored."""

    headers: tuple[tuple[str, str], ...]  # hop-by-hop fields and Age removed
    lines: str  # StaleHit.lines
    has_date: bool
    lifetime: float  # freshness lifetime, seconds
    initial_age: float  # corrected initial age, seconds


def _text(field: bytes) -> str:
    """A field name or value as text: latin-1, so that every byte round-trips (the
    upstream client's decoded view does the same)."""
    return field.decode("latin-1")


def _serving(entry: _Entry) -> _Served:
    """RFC 9111 §4.2.1 freshness lifetime and §4.2.3 initial age of a stored response, and
    its headers as stored (hop-by-hop fields, those `Connection` names, and Age removed)."""
    headers = rules.storable_headers(CIMultiDict([(_text(n), _text(v)) for n, v in entry.raw]))
    date_value = rules.parse_http_date(_text(entry.date)) if entry.date is not None else None
    if date_value is None:
        date_value = entry.response_time  # RFC 9110 §6.6.1: a missing Date is the receipt time
    return _Served(
        headers=headers,
        lines=answer_lines(headers),
        has_date=_has_date(headers),
        lifetime=rules.freshness_lifetime(
            entry.directives,
            shared=entry.key.shared,
            date_value=date_value,
            expires=_text(entry.expires) if entry.expires is not None else None,
        ),
        initial_age=rules.initial_age(
            age_value=rules.parse_age((_text(entry.age),) if entry.age is not None else ()),
            date_value=date_value,
            response_time=entry.response_time,
            response_delay=entry.response_delay,
        ),
    )


@dataclass(slots=True)
class _Variants:
    names: tuple[str, ...]
    entries: dict[VaryValues, _Entry] = field(default_factory=dict)


class EntryWriter:
    """Copies one response body into the store while it streams to the client.

    `feed` every chunk sent, then `finish` once the body completed (the entry is committed
    if it fits `max_entry_bytes` and matches a `Content-Length`), or `abort` on any failure
    (nothing is stored). Past `max_entry_bytes` it drops what it holds and stops copying.
    """

    __slots__ = ("_chunks", "_done", "_entry", "_expected", "_first", "_limit", "_size", "_store")

    def __init__(
        self, store: FallbackStore, entry: _Entry, limit: int, expected: int | None
    ) -> None:
        self._store = store
        self._entry = entry
        self._limit = limit
        self._expected = expected
        # The body so far: `_first` alone while there is one chunk (most bodies that fit an
        # entry arrive in one), then `_chunks` holds them all.
        self._first: bytes | None = None
        self._chunks: list[bytes] | None = None
        self._size = 0
        self._done = False

    @property
    def too_big(self) -> bool:
        return self._size > self._limit

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Copy one body chunk (a reference for `bytes`, a copy for mutable buffers)."""
        if self._done:
            return
        size = self._size = self._size + len(chunk)
        if size > self._limit:
            self._first = self._chunks = None  # past the limit: drop it all, copy no more
            return
        data = chunk if chunk.__class__ is bytes else bytes(chunk)
        if self._first is None:
            self._first = data
        elif self._chunks is None:
            self._chunks = [self._first, data]
        else:
            self._chunks.append(data)

    def finish(self) -> bool:
        """Commit the entry; True when it was stored."""
        if self._done:
            return False
        self._done = True
        first, chunks = self._first, self._chunks
        self._first = self._chunks = None
        if self._size > self._limit:
            return False
        if self._expected is not None and self._size != self._expected:
            return False  # truncated (or overlong) against its Content-Length: incomplete
        if chunks is not None:
            self._entry.body = b"".join(chunks)
        elif first is not None:
            self._entry.body = first
        return self._store._commit(self._entry)

    def abort(self) -> None:
        self._done = True
        self._first = self._chunks = None


class FallbackStore:
    """Stale-if-error responses per key and partition, LRU by bytes (DESIGN §6)."""

    __slots__ = (
        "_clock",
        "_evictions",
        "_keys",
        "_lru",
        "_per_route",
        "_secret",
        "_settings",
        "_size",
        "_variants",
    )

    def __init__(self, settings: CacheSettings, clock: Clock, secret: bytes | None = None) -> None:
        self._settings = settings
        self._clock = clock
        # The partition HMAC key: random per process, so partitions mean nothing elsewhere.
        self._secret = secret if secret is not None else os.urandom(32)
        self._variants: dict[RequestKey, _Variants] = {}
        self._lru: OrderedDict[EntryKey, _Entry] = OrderedDict()
        self._per_route: dict[str, list[int]] = {}  # route -> [entries, bytes]
        self._size = 0
        self._evictions = 0
        # Anonymous request keys by their parts, so a hot URL reuses one key object: no
        # rebuild per request, and the store's dict lookups match it by identity.
        self._keys: dict[tuple[str, str, str, bool, str | None, str | None], RequestKey] = {}

    # -- gauges -------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def bytes(self) -> int:
        return self._size

    @property
    def evictions(self) -> int:
        """Entries removed to make room (LRU, or a reload that shrank the limits)."""
        return self._evictions

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    def stats(self) -> dict[str, object]:
        return {
            "entries": len(self._lru),
            "bytes": self._size,
            "max_bytes": self._settings.max_bytes,
            "max_entry_bytes": self._settings.max_entry_bytes,
            "evictions": self._evictions,
            "per_route": {
                route: {"entries": count, "bytes": size}
                for route, (count, size) in sorted(self._per_route.items())
            },
        }

    # -- configuration -----------------------------------------------------------------

    def update_settings(self, settings: CacheSettings) -> None:
        """Apply reloaded limits: entries now over `max_entry_bytes` go, then LRU ones until
        the store fits `max_bytes`; both count as evictions."""
        self._settings = settings
        oversized = [e for e in self._lru.values() if len(e.body) > settings.max_entry_bytes]
        for entry in oversized:
            self._remove(entry)
            self._evictions += 1
        self._evict_to(settings.max_bytes)

    def clear(self, route: str | None = None) -> int:
        """Remove every entry, or those of one route; returns how many were removed."""
        if route is None:
            removed = len(self._lru)
            self._lru.clear()
            self._variants.clear()
            self._per_route.clear()
            self._size = 0
            return removed
        doomed = [e for e in self._lru.values() if e.key.route == route]
        for entry in doomed:
            self._remove(entry)
        return len(doomed)

    # -- keys ------------------------------------------------------------------------------

    def keys_for(
        self,
        *,
        route: str,
        url_base: str,
        policy: FallbackPolicy,
        upstream_injects_credentials: bool,
    ) -> RouteKeys:
        """The request keys of one route, with what is constant per route worked out once
        (the fallback stage builds one per compiled route)."""
        return RouteKeys(self, route, url_base, policy, upstream_injects_credentials)

    def request_key(
        self,
        *,
        route: str,
        method: str,
        url: str,
        headers: MultiMapping[str],
        policy: FallbackPolicy,
        body_hash: str | None,
        upstream_injects_credentials: bool,
    ) -> RequestKey:
        """The base key of a client request; `headers` as the client sent them, before the
        proxy injects anything. `body_hash` (`key.body_digest`) is required for methods
        other than GET and HEAD: without it such a request is never stored or served.
        The same key as `keys_for(...).key(...)` with `url` = url_base + path and query."""
        keys = RouteKeys(self, route, "", policy, upstream_injects_credentials)
        return keys.key(method, url, headers, body_hash)

    # -- storing ---------------------------------------------------------------------------

    def begin(
        self,
        key: RequestKey,
        *,
        status: int,
        fields: ReceivedFields,
        request_headers: MultiMapping[str],
        policy: FallbackPolicy,
        requested_at: float | None = None,
    ) -> EntryWriter | None:
        """Start storing the final response whose head just arrived, or None when it must
        not be stored (then copy nothing).

        `fields` are the upstream's response header fields as received ((name, value)
        bytes, in order); `request_headers` the client's; `requested_at` the clock.now()
        when the final attempt was sent (for the RFC 9111 §4.2.3 response delay; None counts
        it as 0). One pass over the fields finds what decides storing; what serving needs
        waits for the entry's first lookup.
        """
        method = key.method
        if method not in policy.methods:
            return None
        if key.body_hash is None and method not in _GET_HEAD:
            return None
        # The one pass: the size estimate, and the few fields that matter here, by kind.
        size = 0
        cc_lines: list[str] | None = None
        vary_lines: list[str] | None = None
        lengths: list[bytes] | None = None
        set_cookie = False
        date = expires = age = None
        kinds = _kind_memo
        for name, value in fields:
            size += len(name) + len(value)
            kind = kinds.get(name)
            if kind is None:
                kind = _learn_kind(name)
            if not kind:
                continue
            if kind == _CACHE_CONTROL:
                if cc_lines is None:
                    cc_lines = []
                cc_lines.append(value.decode("latin-1"))
            elif kind == _CONTENT_LENGTH:
                if lengths is None:
                    lengths = []
                lengths.append(value)
            elif kind == _DATE:
                if date is None:
                    date = value
            elif kind == _VARY:
                if vary_lines is None:
                    vary_lines = []
                vary_lines.append(value.decode("latin-1"))
            elif kind == _SET_COOKIE:
                set_cookie = True
            elif kind == _EXPIRES:
                if expires is None:
                    expires = value
            elif age is None:  # _AGE
                age = value
        cc = rules.cache_control(cc_lines) if cc_lines is not None else _NO_CC
        vary = parse_vary(vary_lines) if vary_lines is not None else ()
        refusal = rules.refuse_to_store(
            method=method,
            status=status,
            cc=cc,
            request=rules.request_directives(request_headers),
            set_cookie=set_cookie,
            vary=vary,
            policy=policy,
            shared=key.shared,
        )
        if refusal is not None:
            return None
        settings = self._settings
        limit = settings.max_entry_bytes
        if settings.max_bytes < limit:
            limit = settings.max_bytes
        expected = _expected_length(method, status, lengths)
        if expected is not None and expected > limit:
            return None

        now = self._clock.now()
        drop = cc.no_cache_fields
        if key.shared and cc.private_fields:
            drop = drop | cc.private_fields
        if drop:
            # Fields named by Cache-Control are never kept, not even until the first lookup
            # (RFC 9111 §5.2.2.4, §5.2.2.7).
            names = {name.encode("latin-1", "replace") for name in drop}
            raw = tuple([f for f in fields if f[0].lower() not in names])
        else:
            raw = tuple(fields)  # an own copy of the list; the (name, value) pairs are shared
        entry = _Entry(
            key,
            vary,
            vary_values(vary, request_headers) if vary else (),
            status,
            raw,
            cc,
            date,
            expires,
            age,
            self._clock.wall(),
            0.0 if requested_at is None else now - requested_at,
            now,
            size + ENTRY_OVERHEAD + len(key.url) + HEADER_OVERHEAD * len(raw),
        )
        return EntryWriter(self, entry, limit, expected)

    def _commit(self, entry: _Entry) -> bool:
        size = entry.head_size + len(entry.body)
        settings = self._settings
        if size > settings.max_bytes or len(entry.body) > settings.max_entry_bytes:
            return False
        key = entry.key
        values = entry.vary
        variants = self._variants.get(key)
        if variants is not None:
            if variants.names == entry.vary_names and (
                (previous := variants.entries.get(values)) is not None
            ):
                # The same variant again (the common case: a hot URL): replaced in place, in
                # the same LRU slot moved to the end (the most recently used); the byte
                # counts change only by the size difference.
                variants.entries[values] = entry
                lru_key = (key, values)
                lru = self._lru
                lru[lru_key] = entry
                lru.move_to_end(lru_key)
                delta = size - previous.head_size - len(previous.body)
                if delta:
                    self._size += delta
                    self._per_route[key.route][1] += delta
                    if delta > 0:
                        self._evict_to(settings.max_bytes)
                return True
            if variants.names != entry.vary_names:
                # The newest response's Vary wins (RFC 9111 §4.1): drop the older variants.
                for old in list(variants.entries.values()):
                    self._remove(old)
            variants = self._variants.get(key)
        if variants is None:
            variants = self._variants[key] = _Variants(entry.vary_names)
        variants.entries[values] = entry
        self._lru[(key, values)] = entry
        self._size += size
        counts = self._per_route.get(key.route)
        if counts is None:
            counts = self._per_route[key.route] = [0, 0]
        counts[0] += 1
        counts[1] += size
        self._evict_to(settings.max_bytes)
        return True

    # -- serving ---------------------------------------------------------------------------

    def lookup(
        self, key: RequestKey, request_headers: MultiMapping[str], policy: FallbackPolicy
    ) -> StaleHit | None:
        """The stored response servable now as stale-if-error for this request, or None.

        An entry too stale to ever be served again under `policy` is dropped on the way.
        """
        if key.method not in policy.methods:
            return None
        variants = self._variants.get(key)
        if variants is None:
            return None
        names = variants.names
        values = vary_values(names, request_headers) if names else ()
        entry = variants.entries.get(values)
        if entry is None:
            return None
        served = entry.served
        if served is None:
            served = entry.served = _serving(entry)
        resident = self._clock.now() - entry.stored_at
        current_age = served.initial_age + resident if resident > 0.0 else served.initial_age
        stale_for = rules.staleness(current_age, served.lifetime)
        refusal = rules.refuse_to_serve(
            stale_for=stale_for,
            cc=entry.directives,
            request=rules.request_directives(request_headers),
            policy=policy,
            shared=key.shared,
        )
        if refusal is not None:
            if refusal is rules.Refusal.TOO_STALE:
                self._remove(entry)
            return None
        self._lru.move_to_end((key, values))
        return StaleHit(
            entry.status,
            served.headers,
            entry.body,
            int(current_age),
            stale_for,
            math.floor(served.lifetime - current_age),
            served.lines,
            served.has_date,
        )

    # -- internals -------------------------------------------------------------------------

    def _remove(self, entry: _Entry) -> None:
        values = entry.vary
        del self._lru[(entry.key, values)]
        variants = self._variants[entry.key]
        del variants.entries[values]
        if not variants.entries:
            del self._variants[entry.key]
        size = entry.size
        self._size -= size
        counts = self._per_route[entry.key.route]
        counts[0] -= 1
        counts[1] -= size
        if counts[0] == 0:
            del self._per_route[entry.key.route]

    def _evict_to(self, max_bytes: int) -> None:
        while self._size > max_bytes and self._lru:
            _, oldest = next(iter(self._lru.items()))
            self._remove(oldest)
            self._evictions += 1


def _expected_length(method: str, status: int, values: Sequence[bytes] | None) -> int | None:
    """The body length the response announces (its Content-Length field lines), when it
    has one to check against."""
    if method == "HEAD" or status in _BODYLESS_STATUSES:
        return 0
    if values is None or len(values) != 1:
        return None
    value = values[0].strip()
    return int(value) if value.isdigit() else None  # bytes.isdigit: ASCII digits only


# The response fields `begin` reads, by kind; 0 for any other field.
_CACHE_CONTROL, _VARY, _CONTENT_LENGTH, _SET_COOKIE, _DATE, _EXPIRES, _AGE = range(1, 8)
_FIELD_KINDS: dict[bytes, int] = {
    b"cache-control": _CACHE_CONTROL,
    b"vary": _VARY,
    b"content-length": _CONTENT_LENGTH,
    b"set-cookie": _SET_COOKIE,
    b"date": _DATE,
    b"expires": _EXPIRES,
    b"age": _AGE,
}
# Field names as spelled on the wire -> kind, so a name is lower-cased once, not per response;
# bounded like the parse memos (names up to MEMO_VALUE_MAX bytes, emptied when full).
_kind_memo: dict[bytes, int] = {}
_NO_CC = rules.NO_RESPONSE_DIRECTIVES


def _learn_kind(name: bytes) -> int:
    return rules.remember(_kind_memo, name, _FIELD_KINDS.get(name.lower(), 0))


class RouteKeys:
    """The request keys of one route (`FallbackStore.keys_for`): the URL base, the header
    names that partition (credentials, then `identity_headers`) and the shared-cache flag
    are fixed per route; a key costs a partition check, the Accept-Encoding memo and, in
    the anonymous partition, one lookup among the interned keys."""

    __slots__ = ("_keys", "_names", "_route", "_secret", "_shared", "_url_base")

    def __init__(
        self,
        store: FallbackStore,
        route: str,
        url_base: str,
        policy: FallbackPolicy,
        upstream_injects_credentials: bool,
    ) -> None:
        self._keys = store._keys
        self._secret = store._secret
        self._route = route
        self._url_base = url_base
        self._names = (*CREDENTIAL_HEADERS, *policy.identity_headers)
        # The anonymous partition is a shared cache unless the upstream injects credentials.
        self._shared = not upstream_injects_credentials

    def key(
        self, method: str, path_qs: str, headers: MultiMapping[str], body_hash: str | None
    ) -> RequestKey:
        """The base key of a client request to url_base + `path_qs`; `headers` as the client
        sent them, before the proxy injects anything."""
        url = self._url_base + path_qs
        partition = partition_for(self._secret, headers, self._names)
        accept_encoding = normalise_accept_encoding(headers.getall("accept-encoding", ()))
        if partition is not None:
            return RequestKey(
                self._route, method, url, partition, False, accept_encoding, body_hash
            )
        # The anonymous partition: keys are interned (RequestKey is immutable, so sharing one
        # is the same as building an equal one). Bounded like the parse memos: at most
        # KEY_MEMO_MAX keys with URLs up to KEY_MEMO_URL_MAX characters; emptied when full.
        shared = self._shared
        parts = (self._route, method, url, shared, accept_encoding, body_hash)
        keys = self._keys
        key = keys.get(parts)
        if key is None:
            key = RequestKey(self._route, method, url, None, shared, accept_encoding, body_hash)
            if len(url) <= KEY_MEMO_URL_MAX:
                if len(keys) >= KEY_MEMO_MAX:
                    keys.clear()
                keys[parts] = key
        return key

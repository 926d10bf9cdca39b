"""The fallback store: last good responses, kept to answer when the upstream fails.

One process-wide store, LRU by bytes within `cache.max_bytes`. The fallback stage calls
`request_key` when a request arrives, `begin` when the final response's headers arrive (then
`feed` each body chunk as it streams to the client and `finish` or `abort`), and `lookup`
when the final outcome matches `fallback.on`. The rules themselves live in
`proxy.cache.rules`; keys in `proxy.cache.key`.

Layout: `_variants` maps a base `RequestKey` to the Vary names of its newest stored response
and the entries per Vary values; `_lru` orders every entry by last use. Every operation is a
few dict operations; the body is joined once, at `finish`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from multidict import MultiMapping

from proxy.cache import rules
from proxy.cache.key import (
    RequestKey,
    VaryValues,
    normalise_accept_encoding,
    parse_vary,
    partition_of,
    vary_values,
)
from proxy.clock import Clock
from proxy.config.model import CacheSettings, FallbackPolicy

# Fixed per-entry estimate of the Python objects around body and headers (entry, key, dict
# and LRU slots), bytes; plus 32 bytes per header pair. An estimate, to bound memory.
ENTRY_OVERHEAD = 256
HEADER_OVERHEAD = 32

# Bounds of the anonymous request-key memo (`FallbackStore.request_key`): keys, URL length.
KEY_MEMO_MAX = 1024
KEY_MEMO_URL_MAX = 1024

# Statuses whose responses never carry a body (RFC 9110 §6.4.1).
_BODYLESS_STATUSES = frozenset((204, 304))

EntryKey = tuple[RequestKey, VaryValues]


@dataclass(frozen=True, slots=True)
class StaleHit:
    """A stored response to send as the fallback. Headers are as stored: hop-by-hop fields
    and `Age` removed; the caller adds `Age`, `X-Resilience-*` and `Cache-Status`."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    age: int  # seconds, RFC 9111 §4.2.3 current_age, truncated: the Age header's value
    staleness: float  # seconds beyond the freshness lifetime, >= 0
    ttl: int  # freshness lifetime - current age, seconds (negative when stale), RFC 9211

    def for_head(self) -> StaleHit:
        """This GET answer as the answer to a HEAD (RFC 9110 §9.3.2): the same headers, no
        body, and the Content-Length the GET carries (that of the stored body)."""
        if self.status in _BODYLESS_STATUSES:
            return replace(self, body=b"")
        headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(self.body))))
        return replace(self, headers=tuple(headers), body=b"")


def cache_status_value(
    hit: StaleHit, *, forwarded: bool = True, fwd_status: int | None = None
) -> str:
    """The `Cache-Status` member (RFC 9211) for a stale-if-error answer.

    forwarded (the request reached the upstream, which failed): `fwd=stale` with the
    upstream's status as `fwd-status` when there was one; not forwarded (breaker open,
    bulkhead full): `hit`. E.g. `resilience-proxy; fwd=stale; fwd-status=503; ttl=-120;
    detail=stale-if-error`.
    """
    parts = ["resilience-proxy"]
    if forwarded:
        parts.append("fwd=stale")
        if fwd_status is not None:
            parts.append(f"fwd-status={fwd_status}")
    else:
        parts.append("hit")
    parts.append(f"ttl={hit.ttl}")
    parts.append("detail=stale-if-error")
    return "; ".join(parts)


@dataclass(slots=True, eq=False)
class _Entry:
    key: RequestKey
    vary_names: tuple[str, ...]  # the response's Vary, normalised
    vary: VaryValues  # the request's values for those names
    status: int
    headers: tuple[tuple[str, str], ...]
    directives: rules.ResponseDirectives
    lifetime: float  # freshness lifetime, seconds
    initial_age: float  # corrected initial age, seconds
    stored_at: float  # clock.now() when the response headers arrived
    head_size: int  # estimate of everything but the body, bytes
    body: bytes = b""

    @property
    def size(self) -> int:
        return self.head_size + len(self.body)


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

    __slots__ = ("_chunks", "_done", "_entry", "_expected", "_limit", "_size", "_store")

    def __init__(
        self, store: FallbackStore, entry: _Entry, limit: int, expected: int | None
    ) -> None:
        self._store = store
        self._entry = entry
        self._limit = limit
        self._expected = expected
        self._chunks: list[bytes] = []
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
        if self._size > self._limit:
            self._size += len(chunk)
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self._chunks.clear()
            return
        self._chunks.append(chunk if isinstance(chunk, bytes) else bytes(chunk))

    def finish(self) -> bool:
        """Commit the entry; True when it was stored."""
        if self._done:
            return False
        self._done = True
        chunks, self._chunks = self._chunks, []
        if self._size > self._limit:
            return False
        if self._expected is not None and self._size != self._expected:
            return False  # truncated (or overlong) against its Content-Length: incomplete
        self._entry.body = b"".join(chunks)
        return self._store._commit(self._entry)

    def abort(self) -> None:
        self._done = True
        self._chunks = []


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
        other than GET and HEAD: without it such a request is never stored or served."""
        partition = partition_of(self._secret, headers, policy.identity_headers)
        accept_encoding = normalise_accept_encoding(headers.getall("accept-encoding", ()))
        if partition is not None:
            return RequestKey(route, method, url, partition, False, accept_encoding, body_hash)
        # The anonymous partition: keys are interned (RequestKey is immutable, so sharing one
        # is the same as building an equal one). Bounded like the parse memos: at most
        # KEY_MEMO_MAX keys with URLs up to KEY_MEMO_URL_MAX characters; emptied when full.
        shared = not upstream_injects_credentials
        parts = (route, method, url, shared, accept_encoding, body_hash)
        key = self._keys.get(parts)
        if key is None:
            key = RequestKey(route, method, url, None, shared, accept_encoding, body_hash)
            if len(url) <= KEY_MEMO_URL_MAX:
                if len(self._keys) >= KEY_MEMO_MAX:
                    self._keys.clear()
                self._keys[parts] = key
        return key

    # -- storing ---------------------------------------------------------------------------

    def begin(
        self,
        key: RequestKey,
        *,
        status: int,
        headers: MultiMapping[str],
        request_headers: MultiMapping[str],
        policy: FallbackPolicy,
        requested_at: float | None = None,
    ) -> EntryWriter | None:
        """Start storing the final response whose headers just arrived, or None when it
        must not be stored (then copy nothing).

        `headers` are the upstream's response headers as received; `request_headers` the
        client's; `requested_at` the clock.now() when the final attempt was sent (for the
        RFC 9111 §4.2.3 response delay; None counts it as 0).
        """
        if key.method not in policy.methods:
            return None
        if key.body_hash is None and key.method not in ("GET", "HEAD"):
            return None
        cc = rules.response_directives(headers)
        vary = parse_vary(headers.getall("vary", ()))
        request = rules.request_directives(request_headers)
        refusal = rules.refuse_to_store(
            method=key.method,
            status=status,
            cc=cc,
            request=request,
            response_headers=headers,
            vary=vary,
            policy=policy,
            shared=key.shared,
        )
        if refusal is not None:
            return None
        limit = min(self._settings.max_entry_bytes, self._settings.max_bytes)
        expected = _expected_length(key.method, status, headers)
        if expected is not None and expected > limit:
            return None

        now = self._clock.now()
        response_time = self._clock.wall()
        date_value = _first_date(headers.getall("date", ()))
        if date_value is None:
            date_value = response_time  # RFC 9110 §6.6.1: a missing Date is the receipt time
        expires = headers.getall("expires", ())
        drop = cc.no_cache_fields
        if key.shared and cc.private_fields:
            drop = drop | cc.private_fields
        stored_headers = rules.storable_headers(headers, drop=drop)
        entry = _Entry(
            key=key,
            vary_names=vary,
            vary=vary_values(vary, request_headers),
            status=status,
            headers=stored_headers,
            directives=cc,
            lifetime=rules.freshness_lifetime(
                cc,
                shared=key.shared,
                date_value=date_value,
                expires=expires[0] if expires else None,
            ),
            initial_age=rules.initial_age(
                age_value=rules.parse_age(headers.getall("age", ())),
                date_value=date_value,
                response_time=response_time,
                response_delay=0.0 if requested_at is None else now - requested_at,
            ),
            stored_at=now,
            head_size=_head_size(key, stored_headers),
        )
        return EntryWriter(self, entry, limit, expected)

    def _commit(self, entry: _Entry) -> bool:
        size = entry.size
        if size > self._settings.max_bytes or len(entry.body) > self._settings.max_entry_bytes:
            return False
        values = entry.vary
        variants = self._variants.get(entry.key)
        if variants is not None:
            if variants.names == entry.vary_names and (
                (previous := variants.entries.get(values)) is not None
            ):
                # The same variant again (the common case: a hot URL): replace it in place,
                # now the most recently used; the same result as remove + add, fewer steps.
                variants.entries[values] = entry
                lru_key = (entry.key, values)
                del self._lru[lru_key]
                self._lru[lru_key] = entry
                delta = size - previous.size
                self._size += delta
                self._per_route[entry.key.route][1] += delta
                self._evict_to(self._settings.max_bytes)
                return True
            if variants.names != entry.vary_names:
                # The newest response's Vary wins (RFC 9111 §4.1): drop the older variants.
                for old in list(variants.entries.values()):
                    self._remove(old)
            variants = self._variants.get(entry.key)
        if variants is None:
            variants = self._variants[entry.key] = _Variants(entry.vary_names)
        variants.entries[values] = entry
        self._lru[(entry.key, values)] = entry
        self._size += size
        counts = self._per_route.get(entry.key.route)
        if counts is None:
            counts = self._per_route[entry.key.route] = [0, 0]
        counts[0] += 1
        counts[1] += size
        self._evict_to(self._settings.max_bytes)
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
        values = vary_values(variants.names, request_headers)
        entry = variants.entries.get(values)
        if entry is None:
            return None
        current_age = entry.initial_age + max(0.0, self._clock.now() - entry.stored_at)
        stale_for = rules.staleness(current_age, entry.lifetime)
        refusal = rules.refuse_to_serve(
            stale_for=stale_for,
            cc=entry.directives,
            request=rules.request_directives(request_headers),
            policy=policy,
            shared=key.shared,
        )
        if refusal is rules.Refusal.TOO_STALE:
            self._remove(entry)
            return None
        if refusal is not None:
            return None
        self._lru.move_to_end((key, values))
        return StaleHit(
            status=entry.status,
            headers=entry.headers,
            body=entry.body,
            age=int(current_age),
            staleness=stale_for,
            ttl=math.floor(entry.lifetime - current_age),
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


def _first_date(values: Sequence[str]) -> float | None:
    return rules.parse_http_date(values[0]) if values else None


def _expected_length(method: str, status: int, headers: MultiMapping[str]) -> int | None:
    """The body length the response announces, when it has one to check against."""
    if method == "HEAD" or status in _BODYLESS_STATUSES:
        return 0
    values = headers.getall("content-length", ())
    if len(values) != 1:
        return None
    value = values[0].strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _head_size(key: RequestKey, headers: tuple[tuple[str, str], ...]) -> int:
    size = ENTRY_OVERHEAD + len(key.url) + HEADER_OVERHEAD * len(headers)
    for name, value in headers:
        size += len(name) + len(value)
    return size

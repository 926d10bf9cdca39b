"""Fallback store keys: what makes two requests "the same" for a stored response.

A key is (route, partition, shared, method, upstream URL with query, normalised
Accept-Encoding, request body hash); the values of the request headers named by the stored
response's `Vary` are added at lookup and store time (DESIGN §6 "Fallback store").

The partition is an HMAC-SHA256, under a per-process secret, of the client's
`Authorization`, `Cookie` and `identity_headers` as received (before the proxy injects its
own credentials), so callers with different credentials never share entries and no
credential is kept in memory in clear. No such header: the anonymous partition (None).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from multidict import MultiMapping

from proxy.cache import rules

# Request headers that identify a principal, always part of the partition.
CREDENTIAL_HEADERS: tuple[str, ...] = ("authorization", "cookie")

VaryValues = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class RequestKey:
    """The base key of a request; hashable, used directly as a dict key.

    `shared` is True in the anonymous partition when the upstream injects no credentials:
    there the store acts as a shared cache (RFC 9111 §3.5); elsewhere as the principal's
    private cache. It is part of the key so that a reload that adds or removes injected
    credentials never serves an entry stored under the other regime.
    """

    route: str
    method: str
    url: str
    partition: bytes | None
    shared: bool
    accept_encoding: str | None
    body_hash: str | None
    # Computed once: the key is hashed on every store operation.
    _hash: int = field(init=False, repr=False, compare=False)

    # Written out (the generated frozen __init__ plus __post_init__ costs about twice as
    # much, and a key is built per request): same signature, same fields, same hash.
    def __init__(
        self,
        route: str,
        method: str,
        url: str,
        partition: bytes | None,
        shared: bool,
        accept_encoding: str | None,
        body_hash: str | None,
    ) -> None:
        _set = object.__setattr__
        _set(self, "route", route)
        _set(self, "method", method)
        _set(self, "url", url)
        _set(self, "partition", partition)
        _set(self, "shared", shared)
        _set(self, "accept_encoding", accept_encoding)
        _set(self, "body_hash", body_hash)
        _set(
            self,
            "_hash",
            hash((route, method, url, partition, shared, accept_encoding, body_hash)),
        )

    def __hash__(self) -> int:
        return self._hash

    # Written out too: every store operation compares a fresh key with the stored one. The
    # same result as the generated field-by-field comparison; the cached hashes short-cut
    # unequal keys and identity equal ones.
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, RequestKey)
        return (
            self._hash == other._hash
            and self.url == other.url
            and self.route == other.route
            and self.method == other.method
            and self.partition == other.partition
            and self.shared == other.shared
            and self.accept_encoding == other.accept_encoding
            and self.body_hash == other.body_hash
        )

    @property
    def anonymous(self) -> bool:
        return self.partition is None


def body_digest(body: bytes) -> str:
    """The request body hash for opt-in non-GET/HEAD keys: SHA-256, hex."""
    return hashlib.sha256(body).hexdigest()


def partition_of(
    secret: bytes,
    headers: MultiMapping[str],
    identity_headers: Iterable[str],
    credential_headers: Sequence[str] = CREDENTIAL_HEADERS,
) -> bytes | None:
    """HMAC-SHA256(secret, the credential headers' names and values), or None if none present.

    The message is the present headers as `name NUL value(SOH value)*`, NUL-separated;
    header names and values never hold NUL or SOH, so the encoding is unambiguous.
    `credential_headers` narrows the credentials (quota partitions leave out the ones the
    proxy replaces with its own).
    """
    return partition_for(secret, headers, (*credential_headers, *identity_headers))


def partition_for(secret: bytes, headers: MultiMapping[str], names: Sequence[str]) -> bytes | None:
    """`partition_of` over `names` (lower-case, credentials first) computed once per route."""
    parts: list[str] | None = None
    for name in names:
        values = headers.getall(name, ())
        if values:
            if parts is None:
                parts = []
            parts.append(name)
            parts.append(values[0] if len(values) == 1 else "\x01".join(values))
    if parts is None:
        return None
    message = "\x00".join(parts).encode("utf-8", "surrogateescape")
    return hmac.digest(secret, message, "sha256")


# Normalised Accept-Encoding is memoised per distinct field value (clients send a handful of
# spellings), bounded like the rules' memos (rules.FieldMemo).
_MEMO_MAX = rules.MEMO_MAX


def normalise_accept_encoding(values: Sequence[str]) -> str | None:
    """Accept-Encoding as a key part: members lower-cased, whitespace removed, sorted, q-values
    kept (`gzip;q=0.5`), so `GZip, br` and `br,gzip` match but `gzip` and `identity` do not.
    Absent → None (distinct from an empty field, which asks for identity)."""
    if not values:
        return None
    return _accept_encoding_memo.lookup(values)


def _normalise_accept_encoding(values: Sequence[str]) -> str:
    members = []
    for value in values:
        for member in value.split(","):
            compact = "".join(member.split()).lower()
            if compact:
                members.append(compact)
    members.sort()
    return ",".join(members)


_accept_encoding_memo = rules.FieldMemo(_normalise_accept_encoding)


def parse_vary(values: Sequence[str]) -> tuple[str, ...]:
    """Vary field names, lower-cased, deduplicated and sorted; `("*",)` when Vary is `*`.
    Memoised per distinct single field value (upstreams repeat one or two)."""
    if not values:
        return ()
    return _vary_memo.lookup(values)


def _parse_vary(values: Sequence[str]) -> tuple[str, ...]:
    names = {name.strip().lower() for value in values for name in value.split(",")}
    names.discard("")
    if "*" in names:
        return ("*",)
    return tuple(sorted(names))


_vary_memo = rules.FieldMemo(_parse_vary)


def vary_values(names: tuple[str, ...], headers: MultiMapping[str]) -> VaryValues:
    """The request's values for the Vary names: field lines joined by ", ", each trimmed;
    None when absent (RFC 9111 §4.1: absent only matches absent)."""
    if not names:
        return ()
    getall = headers.getall
    if len(names) == 1:
        values = getall(names[0], ())
        if len(values) == 1:
            return (values[0].strip(),)
        return (", ".join([v.strip() for v in values]) if values else None,)
    out: list[str | None] = []
    for name in names:
        values = getall(name, ())
        out.append(", ".join([v.strip() for v in values]) if values else None)
    return tuple(out)

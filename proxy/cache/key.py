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

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_hash",
            hash(
                (
                    self.route,
                    self.method,
                    self.url,
                    self.partition,
                    self.shared,
                    self.accept_encoding,
                    self.body_hash,
                )
            ),
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def anonymous(self) -> bool:
        return self.partition is None


def body_digest(body: bytes) -> str:
    """The request body hash for opt-in non-GET/HEAD keys: SHA-256, hex."""
    return hashlib.sha256(body).hexdigest()


def partition_of(
    secret: bytes, headers: MultiMapping[str], identity_headers: Iterable[str]
) -> bytes | None:
    """HMAC-SHA256(secret, the credential headers' names and values), or None if none present.

    The message is the present headers as `name NUL value(SOH value)*`, NUL-separated;
    header names and values never hold NUL or SOH, so the encoding is unambiguous.
    """
    parts: list[str] = []
    for name in (*CREDENTIAL_HEADERS, *identity_headers):
        values = headers.getall(name, ())
        if values:
            parts.append(name)
            parts.append("\x01".join(values))
    if not parts:
        return None
    message = "\x00".join(parts).encode("utf-8", "surrogateescape")
    return hmac.digest(secret, message, "sha256")


def normalise_accept_encoding(values: Sequence[str]) -> str | None:
    """Accept-Encoding as a key part: members lower-cased, whitespace removed, sorted, q-values
    kept (`gzip;q=0.5`), so `GZip, br` and `br,gzip` match but `gzip` and `identity` do not.
    Absent → None (distinct from an empty field, which asks for identity)."""
    if not values:
        return None
    members = []
    for value in values:
        for member in value.split(","):
            compact = "".join(member.split()).lower()
            if compact:
                members.append(compact)
    members.sort()
    return ",".join(members)


def parse_vary(values: Sequence[str]) -> tuple[str, ...]:
    """Vary field names, lower-cased, deduplicated and sorted; `("*",)` when Vary is `*`."""
    if not values:
        return ()
    names = {name.strip().lower() for value in values for name in value.split(",")}
    names.discard("")
    if "*" in names:
        return ("*",)
    return tuple(sorted(names))


def vary_values(names: tuple[str, ...], headers: MultiMapping[str]) -> VaryValues:
    """The request's values for the Vary names: field lines joined by ", ", each trimmed;
    None when absent (RFC 9111 §4.1: absent only matches absent)."""
    if not names:
        return ()
    out: list[str | None] = []
    for name in names:
        values = headers.getall(name, ())
        out.append(", ".join(v.strip() for v in values) if values else None)
    return tuple(out)

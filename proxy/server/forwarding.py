"""Forwarding rules of DESIGN §5: request-target checks, path joining, header rewriting.

Everything that can be computed once per route or upstream is computed when a config is
compiled (`UpstreamHeaders`); the per-request functions only filter and append.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict

from proxy.cache.rules import remember
from proxy.config.model import Route, Upstream
from proxy.errors import ProxyError
from proxy.headers import HOP_BY_HOP, VIA_VALUE

_ENCODED_DOTS = ("%2e", "%2E")


def split_target(raw: str) -> tuple[str, str]:
    """Validate an origin-form request target; return (raw path, raw query incl. '?' or '').

    Refused (400): absolute-form and asterisk-form targets, dot-segments (also
    percent-encoded), backslashes (also %5C) and NUL (also %00).
    """
    if not raw.startswith("/"):
        raise ProxyError.bad_request("only origin-form request targets are accepted")
    path, sep, query = raw.partition("?")
    if "/." not in path and "%" not in path and "\\" not in path and "\x00" not in path:
        return path, sep + query  # most paths: no dot-segment, nothing encoded
    if "\\" in path or "\x00" in path or ("%" in path and _has_encoded_danger(path)):
        raise ProxyError.bad_request("the path contains a backslash or NUL")
    for segment in path.split("/"):
        if segment in (".", "..") or ("%" in segment and _decode_dots(segment) in (".", "..")):
            raise ProxyError.bad_request("the path contains a dot-segment")
    return path, sep + query


def _has_encoded_danger(path: str) -> bool:
    lowered = path.lower()
    return "%5c" in lowered or "%00" in lowered


def _decode_dots(segment: str) -> str:
    for enc in _ENCODED_DOTS:
        segment = segment.replace(enc, ".")
    return segment


def upstream_path(route: Route, path: str) -> str:
    """The path sent upstream: base + "/" + rest, the rest forwarded byte for byte."""
    rest = path
    if route.strip_prefix:
        bare = route.match.path_prefix.rstrip("/")
        rest = path[len(bare) :]
    return route.upstream.base_path.rstrip("/") + "/" + rest.lstrip("/")


def connection_tokens(headers: CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


class ClientInfo(Protocol):
    """What X-Forwarded-* and Link rewriting need from the client's request."""

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def host(self) -> str: ...


_FORWARDED_SET = frozenset(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"))
_NO_PEER_SET = frozenset(("x-forwarded-proto", "x-forwarded-host"))

# The request headers sent upstream: (name, value) pairs in order (what `UpstreamClient.send`
# serialises; it adds the framing fields itself).
HeaderList = list[tuple[str, str]]
# Or, as `upstream_header_block` makes them, already serialised (bytes, CRLF-ended lines).
OutgoingHeaders = bytes | HeaderList


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """Per-upstream header rewriting, computed once when a config is compiled."""

    skip: frozenset[str]  # lower-case names never copied from the client
    injected: tuple[tuple[str, str], ...]
    host: str
    forwarded: bool
    request_id: bool  # send a generated X-Request-Id
    # `skip` plus the X-Forwarded-* fields the proxy sets itself (when `forwarded`)
    skip_forwarded: frozenset[str] = frozenset()
    # What every request to this upstream ends with, serialised once: Host, the injected
    # fields, Via (`upstream_header_block`).
    tail: bytes = b""
    # Per skip set in use (see `_keeps`): field name as the client spelled it -> kept?
    keep: tuple[dict[bytes, bool], ...] = field(
        default_factory=lambda: tuple({} for _ in range(6)), compare=False, repr=False
    )

    @classmethod
    def for_upstream(cls, upstream: Upstream) -> HeaderPlan:
        # Content-Length is recomputed by the upstream client from the body it sends.
        skip = HOP_BY_HOP | {"host", "expect", "content-length"}
        skip |= {name for name, _ in upstream.headers}
        if upstream.userinfo and "authorization" not in skip:
            skip |= {"authorization"}  # the upstream client sends the URL's userinfo instead
        # Injected names are lower-case and their values UTF-8 bytes read as latin-1, so
        # the latin-1 encoding below gives back the bytes the config meant.
        lines = [("Host", upstream.host), *upstream.headers, ("Via", VIA_VALUE)]
        tail = "".join(f"{name}: {value}\r\n" for name, value in lines)
        return cls(
            skip,
            upstream.headers,
            upstream.host,
            upstream.forwarded_headers,
            upstream.request_id,
            skip | _FORWARDED_SET,
            tail.encode("latin-1", "replace"),
        )


def build_upstream_headers(
    incoming: CIMultiDict[str],
    plan: HeaderPlan,
    client: ClientInfo,
    generated_id: str | None = None,
) -> HeaderList:
    """The request headers to send upstream (DESIGN §5 "Headers"); `generated_id` is the
    request ID the proxy made up (the client sent none), sent where the upstream wants it."""
    forwarded = plan.forwarded
    client_ip = client.remote if forwarded else None
    skip = _skip_set(plan, client_ip)
    send_id = generated_id is not None and plan.request_id
    if send_id or "Connection" in incoming:
        skip = skip | connection_tokens(incoming)
        if send_id:
            skip = skip | {"x-request-id"}  # the client's was unusable: ours replaces it
    out: HeaderList = [
        (name, value)
        for name, value in incoming.items()
        if _forwards(name.lower(), skip, forwarded)
    ]
    out.append(("Host", plan.host))
    out += plan.injected
    out.append(("Via", VIA_VALUE))
    if send_id:
        assert generated_id is not None
        out.append(("X-Request-Id", generated_id))
    if forwarded:
        out += _forwarded_fields(incoming, client, client_ip)
    return out


def _skip_set(plan: HeaderPlan, client_ip: str | None) -> frozenset[str]:
    """The names never copied from the client: with `forwarded_headers`, also the
    X-Forwarded-* fields the proxy sets (a client's X-Forwarded-For is kept only when the
    proxy has no peer address to append)."""
    if not plan.forwarded:
        return plan.skip
    return plan.skip_forwarded if client_ip else plan.skip | _NO_PEER_SET


def _forwards(lname: str, skip: frozenset[str], forwarded: bool) -> bool:
    """Whether a client field (lower-case name) goes upstream."""
    if lname in skip:
        return False
    return not lname.startswith("x-") or not (
        lname.startswith("x-resilience-") or (not forwarded and lname.startswith("x-forwarded-"))
    )


def _forwarded_fields(
    incoming: CIMultiDict[str], client: ClientInfo, client_ip: str | None
) -> HeaderList:
    """X-Forwarded-For, -Proto and -Host, as the proxy sets them."""
    out: HeaderList = []
    if client_ip:
        prior = incoming.get("X-Forwarded-For")
        out.append(("X-Forwarded-For", f"{prior}, {client_ip}" if prior else client_ip))
    out.append(("X-Forwarded-Proto", client.scheme))
    client_host = client.host
    if client_host:
        out.append(("X-Forwarded-Host", client_host))
    elif "X-Forwarded-Host" in incoming:
        out.append(("X-Forwarded-Host", incoming["X-Forwarded-Host"]))
    return out


def upstream_header_block(
    raw: list[tuple[bytes, bytes]],
    incoming: CIMultiDict[str],
    plan: HeaderPlan,
    client: ClientInfo,
    generated_id: str | None = None,
) -> OutgoingHeaders:
    """`build_upstream_headers` as the serialised header lines (bytes, CRLF-ended, without
    framing), built from the client's fields as received (`raw`, bytes) so each kept field
    is copied byte for byte with no decoding; `incoming` is the decoded view of the same
    fields. Which names are kept is remembered per plan. A `Connection` header that names
    other fields (rare) takes the general path and returns its `HeaderList`."""
    forwarded = plan.forwarded
    client_ip = client.remote if forwarded else None
    send_id = generated_id is not None and plan.request_id
    if "Connection" in incoming and not connection_tokens(incoming) <= HOP_BY_HOP:
        return build_upstream_headers(incoming, plan, client, generated_id)
    variant = (0 if not forwarded else 1 if client_ip else 2) + (3 if send_id else 0)
    memo = plan.keep[variant]
    out: list[bytes] = []
    for name, value in raw:
        keep = memo.get(name)
        if keep is None:
            keep = _keeps(plan, variant, name, client_ip)
        if keep:
            out += (name, b": ", value.rstrip(b" \t"), b"\r\n")
    out.append(plan.tail)
    if send_id:
        assert generated_id is not None
        out.append(f"X-Request-Id: {generated_id}\r\n".encode("latin-1"))
    if forwarded:
        lines = "".join(f"{n}: {v}\r\n" for n, v in _forwarded_fields(incoming, client, client_ip))
        out.append(lines.encode("latin-1", "replace"))
    return b"".join(out)


def _keeps(plan: HeaderPlan, variant: int, name: bytes, client_ip: str | None) -> bool:
    """`_forwards` for a client field name as received, under the request's skip set (one
    of the plan's six `variant`s: forwarded or not, with or without a peer address, our
    own X-Request-Id or not), remembered for that variant."""
    lname = name.decode("latin-1").lower()
    keep = _forwards(lname, _skip_set(plan, client_ip), plan.forwarded) and not (
        variant >= 3 and lname == "x-request-id"
    )
    return remember(plan.keep[variant], name, keep)


# Response fields the head builder looks at (lower-case bytes): dropped (hop-by-hop, and
# Content-Length, which the listener frames itself), rewritten, or noted.
_HOP_BY_HOP_B = frozenset(name.encode() for name in HOP_BY_HOP)
_COPY, _DATE, _LENGTH, _LOCATION, _LINK, _CONNECTION, _DROP = range(7)
_KINDS_B = {
    b"date": _DATE,
    b"content-length": _LENGTH,
    b"location": _LOCATION,
    b"link": _LINK,
    b"connection": _CONNECTION,
}
# Field name as received -> its kind: an upstream sends the same few names in the same
# spelling on every answer, so the name is looked up instead of lower-cased and compared.
_kind_memo: dict[bytes, int] = {}


def _kind(name: bytes) -> int:
    lname = name.lower()
    kind = _KINDS_B.get(lname, _DROP if lname in _HOP_BY_HOP_B else _COPY)
    return remember(_kind_memo, name, kind)


def client_head_lines(
    raw: list[tuple[bytes, bytes]],
    route: Route,
    client: ClientInfo | None = None,
) -> tuple[bytes, str | None, bool]:
    """Response header lines for the client (`Name: value\r\n` each, bytes as the upstream
    sent them), the upstream's Content-Length, and whether it sent a Date: hop-by-hop
    fields (and those `Connection` names) removed, Location and Link rewritten. `Via` is the
    route's prebuilt part, added by the caller."""
    out: list[bytes] = []
    length: str | None = None
    has_date = False
    named: list[bytes] | None = None  # Connection's tokens, when it names other fields
    memo = _kind_memo
    for name, value in raw:
        kind = memo.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == _COPY:
            out += (name, b": ", value, b"\r\n")
        elif kind == _DATE:
            has_date = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _LENGTH:
            if length is None:
                length = value.decode("latin-1")
        elif kind == _LOCATION:
            text = rewrite_location(value.decode("latin-1"), route)
            out += (name, b": ", _encode(text), b"\r\n")
        elif kind == _LINK:
            text = value.decode("latin-1")
            if route.upstream.url in text:
                origin = f"{client.scheme}://{client.host}" if client is not None else ""
                text = rewrite_link(text, route, origin)
            out += (name, b": ", _encode(text), b"\r\n")
        elif kind == _CONNECTION:
            tokens = [t.strip().lower() for t in value.split(b",")]
            extra = [t for t in tokens if t and t != b"close" and t not in _HOP_BY_HOP_B]
            if extra:
                named = (named or []) + extra
    if named:
        # Rare: the upstream named fields of its own as hop-by-hop; drop those too.
        drop = frozenset(named)
        kept: list[bytes] = []
        for i in range(0, len(out), 4):
            if out[i].lower() not in drop:
                kept += out[i : i + 4]
        out = kept
    return b"".join(out), length, has_date


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


# Never relayed from a stored answer as is: the listener frames the answer itself.
_FRAMING = frozenset(("content-length",))


def stored_head_lines(headers: Iterable[tuple[str, str]], replaced: frozenset[str]) -> str:
    """Header lines of a stored or static answer, without framing and the `replaced` names
    (lower-case) that the caller sets itself."""
    skip = _skip_sets.get(replaced)
    if skip is None:
        if len(_skip_sets) >= 16:  # callers pass a few constant sets; bounded all the same
            _skip_sets.clear()
        skip = _skip_sets[replaced] = replaced | _FRAMING | HOP_BY_HOP
    return "".join([f"{name}: {value}\r\n" for name, value in headers if name.lower() not in skip])


# `replaced | _FRAMING | HOP_BY_HOP` per `replaced` set seen.
_skip_sets: dict[frozenset[str], frozenset[str]] = {}


def rewrite_location(location: str, route: Route) -> str:
    """A Location under the upstream URL becomes a path under the route's prefix."""
    base = route.upstream.url
    if not location.startswith(base):
        return location
    rest = location[len(base) :]
    if rest and rest[0] not in "/?#":
        return location  # https://api.example.comX/... is another host
    if not route.strip_prefix:
        return rest if rest.startswith("/") else "/" + rest
    prefix = route.match.path_prefix.rstrip("/")
    if rest.startswith("/"):
        return prefix + rest
    return prefix + "/" + rest


def rewrite_link(value: str, route: Route, client_origin: str) -> str:
    """Rewrite the URLs of a `Link` header (RFC 8288) that point under the upstream URL, so
    pagination (GitHub's `rel="next"`) keeps going through the proxy and its credentials.

    Link targets become absolute on the proxy's origin as the client addressed it, since
    SDKs follow them verbatim."""
    parts = value.split("<")
    out = [parts[0]]
    for part in parts[1:]:
        target, sep, rest = part.partition(">")
        if sep and target.startswith(route.upstream.url):
            target = client_origin + rewrite_location(target, route)
        out.append(target + sep + rest if sep else part)
    return "<".join(out)

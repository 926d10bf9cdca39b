"""HTTP caching rules for the fallback store: RFC 9111 (caching) and RFC 5861 (stale-if-error).

Pure functions over header values; times are float seconds (wall-clock epoch for HTTP dates,
durations otherwise). Nothing here reads a clock; the only state is memoisation of pure
parses (Cache-Control values, HTTP dates, the excluded-header sets), bounded, so the same
header value is parsed once, not per request. The store calls these once when a response's
headers arrive (may it be stored?), at an entry's first lookup (its stored headers, freshness
lifetime and initial age) and once per lookup (what the request allows, may the entry be
served as stale-if-error).

Deliberate choices, all on the side of serving less:
- only heuristically cacheable statuses are stored (DESIGN §6), even with explicit freshness;
- the heuristic freshness lifetime is 0: without `max-age`/`s-maxage`/`Expires` a response is
  stale as soon as it is stored, and only `stale_if_error` decides how long it may serve;
- an invalid `max-age`/`s-maxage`/`Expires` means "already stale" (RFC 9111 §4.2.1), an
  invalid `stale-if-error` or `max-stale` value means 0 seconds;
- a response that could never be served under the current policy (`must-revalidate` or
  `no-cache` without `override_revalidate`, `s-maxage`/`proxy-revalidate` in the shared
  partition) is not stored at all: the store exists only to serve on error.
"""

from __future__ import annotations

import email.utils
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from multidict import MultiMapping

from proxy.config.model import FallbackPolicy
from proxy.headers import HOP_BY_HOP

# RFC 9110 §15.1: statuses a cache may store without explicit freshness information.
HEURISTICALLY_CACHEABLE: frozenset[int] = frozenset(
    (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)
)

# RFC 9110 §7.6.1 plus the proxy-only ones DESIGN §5 removes both ways. `Age` is also never
# stored: the current age is recomputed when the entry is served.
_NOT_STORED_HEADERS: frozenset[str] = HOP_BY_HOP | {"age"}

# RFC 9111 §1.2.2: delta-seconds larger than this are capped to it.
DELTA_SECONDS_MAX = 2_147_483_648

# Memo bounds: parsed results are kept per distinct raw header value, at most MEMO_MAX of
# them (the memo is emptied when full), and only for values up to MEMO_VALUE_MAX characters,
# so neither many distinct values nor huge ones can grow memory. Upstreams and clients
# repeat a handful of Cache-Control / Connection values, so almost every call is a hit.
MEMO_MAX = 256
MEMO_VALUE_MAX = 512

T = TypeVar("T")
K = TypeVar("K", str, bytes)


def remember(memo: dict[K, T], key: K, value: T) -> T:
    """Keep `value` under `key` in a memo bounded as above (keys up to MEMO_VALUE_MAX long,
    emptied when it holds MEMO_MAX); returns `value`."""
    if len(key) <= MEMO_VALUE_MAX:
        if len(memo) >= MEMO_MAX:
            memo.clear()
        memo[key] = value
    return value


class FieldMemo(dict[str, T]):
    """`parse(values)` of a header field, memoised by its raw value when it is one line."""

    def __init__(self, parse: Callable[[Sequence[str]], T]) -> None:
        super().__init__()
        self._parse = parse

    def lookup(self, values: Sequence[str]) -> T:
        if len(values) != 1:
            return self._parse(values)
        value = values[0]
        result = self.get(value)
        if result is None:
            result = self._parse(values)
            if len(value) <= MEMO_VALUE_MAX:
                if len(self) >= MEMO_MAX:
                    self.clear()
                self[value] = result
        return result


class Refusal(StrEnum):
    """Why a response is not stored, or a stored entry not served (for logs and tests)."""

    METHOD = "method"  # not in fallback.methods
    STATUS = "status"  # not heuristically cacheable (RFC 9110 §15.1)
    NO_BODY_HASH = "no-body-hash"  # a non-GET/HEAD body that was streamed, not hashed
    NO_STORE = "no-store"  # request or response no-store (RFC 9111 §5.2.1.5, §5.2.2.5)
    VARY_ANY = "vary-any"  # Vary: * (RFC 9111 §4.1)
    SET_COOKIE = "set-cookie"  # Set-Cookie without store_set_cookie
    PRIVATE = "private"  # private in the shared partition (RFC 9111 §5.2.2.7)
    TOO_LARGE = "too-large"  # Content-Length beyond max_entry_bytes
    MUST_REVALIDATE = "must-revalidate"  # RFC 9111 §5.2.2.2
    NO_CACHE = "no-cache"  # response no-cache, unqualified (RFC 9111 §5.2.2.4)
    S_MAXAGE = "s-maxage"  # shared partition (RFC 9111 §5.2.2.10)
    PROXY_REVALIDATE = "proxy-revalidate"  # shared partition (RFC 9111 §5.2.2.8)
    TOO_STALE = "too-stale"  # beyond stale_if_error / the response's stale-if-error=N
    REQUEST_NO_CACHE = "request-no-cache"  # RFC 9111 §5.2.1.4
    REQUEST_NO_STORE = "request-no-store"  # RFC 9111 §5.2.1.5
    MAX_STALE = "max-stale"  # request max-stale below the staleness (RFC 9111 §5.2.1.2)


def parse_directives(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives (RFC 9111 §5.2), names lower-cased, quoted values unquoted.

    Several field lines form one list; for a repeated directive the first occurrence wins
    (RFC 9111 §4.2.1). A directive without `=` maps to None.
    """
    out: dict[str, str | None] = {}
    for value in values:
        i, n = 0, len(value)
        while i < n:
            while i < n and value[i] in " \t,":
                i += 1
            if i >= n:
                break
            start = i
            while i < n and value[i] not in "=,":
                i += 1
            name = value[start:i].strip().lower()
            arg: str | None = None
            if i < n and value[i] == "=":
                i += 1
                while i < n and value[i] in " \t":
                    i += 1
                if i < n and value[i] == '"':
                    i += 1
                    buf: list[str] = []
                    while i < n and value[i] != '"':
                        if value[i] == "\\" and i + 1 < n:
                            i += 1
                        buf.append(value[i])
                        i += 1
                    arg = "".join(buf)
                    while i < n and value[i] != ",":
                        i += 1
                else:
                    start = i
                    while i < n and value[i] != ",":
                        i += 1
                    arg = value[start:i].strip()
            if name and name not in out:
                out[name] = arg
    return out


def delta_seconds(arg: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds: ASCII digits only, capped at 2^31; else None."""
    if arg is None or not arg or not arg.isascii() or not arg.isdigit():
        return None
    return min(int(arg), DELTA_SECONDS_MAX)


@functools.lru_cache(maxsize=256)
def parse_http_date(value: str) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, RFC 850 or asctime) as epoch seconds.

    Memoised: responses within the same second carry the same Date."""
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def _field_names(arg: str | None) -> frozenset[str]:
    if not arg:
        return frozenset()
    return frozenset(name.strip().lower() for name in arg.split(",") if name.strip())


@dataclass(frozen=True, slots=True)
class ResponseDirectives:
    """The response Cache-Control directives the store acts on, parsed once at store time."""

    no_store: bool = False
    no_cache: bool = False  # unqualified: never reused without revalidation
    no_cache_fields: frozenset[str] = frozenset()  # qualified: these fields are never reused
    private: bool = False  # unqualified
    private_fields: frozenset[str] = frozenset()  # qualified: kept out of a shared cache
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    max_age: int | None = None  # seconds; None: absent
    s_maxage: int | None = None  # seconds; None: absent
    stale_if_error: int | None = None  # RFC 5861 §4, seconds; None: absent


NO_RESPONSE_DIRECTIVES = ResponseDirectives()


def response_directives(headers: MultiMapping[str]) -> ResponseDirectives:
    """The response's Cache-Control, parsed once per distinct single field value (memoised:
    the result is immutable)."""
    return cache_control(headers.getall("cache-control", ()))


def cache_control(values: Sequence[str]) -> ResponseDirectives:
    """`response_directives` of the Cache-Control field lines themselves."""
    if not values:
        return NO_RESPONSE_DIRECTIVES
    return _response_memo.lookup(values)


def _response_directives(values: Sequence[str]) -> ResponseDirectives:
    d = parse_directives(values)
    no_cache = "no-cache" in d
    private = "private" in d
    max_age = s_maxage = sie = None
    if "max-age" in d:
        max_age = delta_seconds(d["max-age"]) or 0
    if "s-maxage" in d:
        s_maxage = delta_seconds(d["s-maxage"]) or 0
    if "stale-if-error" in d:
        sie = delta_seconds(d["stale-if-error"]) or 0
    return ResponseDirectives(
        no_store="no-store" in d,
        no_cache=no_cache and not d["no-cache"],
        no_cache_fields=_field_names(d["no-cache"]) if no_cache else frozenset(),
        private=private and not d["private"],
        private_fields=_field_names(d["private"]) if private else frozenset(),
        must_revalidate="must-revalidate" in d,
        proxy_revalidate="proxy-revalidate" in d,
        max_age=max_age,
        s_maxage=s_maxage,
        stale_if_error=sie,
    )


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """What the client's request allows a stale-if-error answer to be."""

    no_cache: bool = False
    no_store: bool = False
    max_stale: float | None = None  # seconds; None: absent; inf: any staleness


NO_REQUEST_DIRECTIVES = RequestDirectives()


_response_memo = FieldMemo(_response_directives)


def request_directives(headers: MultiMapping[str]) -> RequestDirectives:
    """Request Cache-Control; `Pragma: no-cache` counts as no-cache when Cache-Control is
    absent (HTTP/1.0 clients, RFC 7234 §5.4). Memoised per distinct single field value."""
    values = headers.getall("cache-control", ())
    if not values:
        for pragma in headers.getall("pragma", ()):
            if "no-cache" in parse_directives((pragma,)):
                return RequestDirectives(no_cache=True)
        return NO_REQUEST_DIRECTIVES
    return _request_memo.lookup(values)


def _request_directives(values: Sequence[str]) -> RequestDirectives:
    d = parse_directives(values)
    max_stale: float | None = None
    if "max-stale" in d:
        arg = d["max-stale"]
        max_stale = math.inf if arg is None else float(delta_seconds(arg) or 0)
    return RequestDirectives(
        no_cache="no-cache" in d, no_store="no-store" in d, max_stale=max_stale
    )


_request_memo = FieldMemo(_request_directives)


def freshness_lifetime(
    cc: ResponseDirectives, *, shared: bool, date_value: float, expires: str | None
) -> float:
    """RFC 9111 §4.2.1, seconds: s-maxage (shared cache only), else max-age, else
    Expires - Date, else 0 (no heuristic freshness: stale once stored)."""
    if shared and cc.s_maxage is not None:
        return float(cc.s_maxage)
    if cc.max_age is not None:
        return float(cc.max_age)
    if expires is not None:
        expires_at = parse_http_date(expires)
        if expires_at is None:
            return 0.0
        return max(0.0, expires_at - date_value)
    return 0.0


def parse_age(values: Sequence[str]) -> float:
    """The Age field (RFC 9111 §5.1): first list member; invalid or absent → 0."""
    if not values:
        return 0.0
    seconds = delta_seconds(values[0].split(",", 1)[0].strip())
    return float(seconds) if seconds is not None else 0.0


def initial_age(
    *, age_value: float, date_value: float, response_time: float, response_delay: float
) -> float:
    """RFC 9111 §4.2.3 corrected_initial_age, seconds:
    max(max(0, response_time - date_value), age_value + response_delay).

    `response_time` and `date_value` are wall-clock epoch seconds; `response_delay` is
    response_time - request_time, measured on the monotonic clock. The current age is this
    plus the resident time (now - response_time).
    """
    # Conditional expressions, not max(): the same values (ties keep the first), per request.
    apparent_age = response_time - date_value
    if not apparent_age > 0.0:
        apparent_age = 0.0
    corrected_age_value = age_value + (response_delay if response_delay > 0.0 else 0.0)
    return corrected_age_value if corrected_age_value > apparent_age else apparent_age


def staleness(current_age: float, lifetime: float) -> float:
    """Seconds beyond the freshness lifetime: max(0, current_age - freshness_lifetime)."""
    return max(0.0, current_age - lifetime)


def never_servable(
    cc: ResponseDirectives, policy: FallbackPolicy, *, shared: bool
) -> Refusal | None:
    """A response-level prohibition on serving stale (RFC 9111 §4.2.4), whatever its age."""
    if not policy.override_revalidate:
        if cc.must_revalidate:
            return Refusal.MUST_REVALIDATE
        if cc.no_cache:
            return Refusal.NO_CACHE
    if shared:
        if cc.s_maxage is not None:
            return Refusal.S_MAXAGE
        if cc.proxy_revalidate:
            return Refusal.PROXY_REVALIDATE
    return None


def refuse_to_store(
    *,
    method: str,
    status: int,
    cc: ResponseDirectives,
    request: RequestDirectives,
    set_cookie: bool,
    vary: tuple[str, ...],
    policy: FallbackPolicy,
    shared: bool,
) -> Refusal | None:
    """Why this response must not be stored as a fallback, or None if it may be (RFC 9111 §3,
    DESIGN §6 "Fallback store")."""
    if method not in policy.methods:
        return Refusal.METHOD
    if status not in HEURISTICALLY_CACHEABLE:
        return Refusal.STATUS
    if cc.no_store or request.no_store:
        return Refusal.NO_STORE
    if "*" in vary:
        return Refusal.VARY_ANY
    if set_cookie and not policy.store_set_cookie:
        return Refusal.SET_COOKIE
    if shared and cc.private:
        return Refusal.PRIVATE
    return never_servable(cc, policy, shared=shared)


def max_staleness(cc: ResponseDirectives, policy: FallbackPolicy) -> float:
    """The most staleness an entry may ever be served at, seconds:
    min(fallback.stale_if_error, the response's stale-if-error=N if present) (RFC 5861 §4)."""
    if cc.stale_if_error is None:
        return policy.stale_if_error
    return min(policy.stale_if_error, float(cc.stale_if_error))


def refuse_to_serve(
    *,
    stale_for: float,
    cc: ResponseDirectives,
    request: RequestDirectives,
    policy: FallbackPolicy,
    shared: bool,
) -> Refusal | None:
    """Why an entry `stale_for` seconds stale must not answer this request on error, or None
    (RFC 9111 §4.2.4, §5.2.1, RFC 5861 §4, DESIGN §6 "Fallback serving").

    TOO_STALE is the only refusal that grows with time: such an entry can be dropped.
    """
    refusal = never_servable(cc, policy, shared=shared)
    if refusal is not None:
        return refusal
    if request.no_cache:
        return Refusal.REQUEST_NO_CACHE
    if request.no_store:
        return Refusal.REQUEST_NO_STORE
    if stale_for > max_staleness(cc, policy):
        return Refusal.TOO_STALE
    if request.max_stale is not None and stale_for > request.max_stale:
        return Refusal.MAX_STALE
    return None


_excluded_memo: dict[tuple[str | None, frozenset[str]], frozenset[str]] = {}


def storable_headers(
    headers: MultiMapping[str], *, drop: frozenset[str] = frozenset()
) -> tuple[tuple[str, str], ...]:
    """The response's headers as (name, value) pairs to store, in order, without hop-by-hop
    fields, the fields `Connection` names, `Age`, and `drop` (lower-case names)."""
    connection = headers.getall("connection", ())
    if not connection and not drop:
        excluded = _NOT_STORED_HEADERS
    elif len(connection) > 1 or (connection and len(connection[0]) > MEMO_VALUE_MAX):
        excluded = _excluded_names(connection, drop)
    else:
        memo_key = (connection[0] if connection else None, drop)
        cached = _excluded_memo.get(memo_key)
        if cached is None:
            cached = _excluded_names(connection, drop)
            if len(_excluded_memo) >= MEMO_MAX:
                _excluded_memo.clear()
            _excluded_memo[memo_key] = cached
        excluded = cached
    return tuple([(name, value) for name, value in headers.items() if name.lower() not in excluded])


def _excluded_names(connection: Sequence[str], drop: frozenset[str]) -> frozenset[str]:
    """The lower-case names never stored: hop-by-hop, `Age`, `drop`, and those `Connection`
    names."""
    return (
        _NOT_STORED_HEADERS
        | drop
        | {token.strip().lower() for value in connection for token in value.split(",")}
    )

"""The serialised request headers (`upstream_header_block`, what the listener forwards) are
exactly what the field-by-field rules (`build_upstream_headers`) would send, for any
client head, any upstream setting and any client; and the names it remembers per plan
never let one request's decision leak into another's."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config.model import Upstream
from proxy.server.forwarding import (
    HeaderPlan,
    build_upstream_headers,
    upstream_header_block,
)


@dataclass
class _Client:
    remote: str | None
    scheme: str
    host: str


def _upstream(forwarded: bool, request_id: bool, injected: bool, userinfo: bool) -> Upstream:
    return Upstream(
        name="api",
        url="http://api.example:8080/v1",
        scheme="http",
        host="api.example:8080",
        base_path="/v1",
        headers=(("authorization", "Bearer inj\xc3\xa9"),) if injected else (),
        forwarded_headers=forwarded,
        request_id=request_id,
        userinfo=("u", "p") if userinfo else None,
    )


def _serialised(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{n}: {v}\r\n" for n, v in pairs).encode("latin-1")


NAMES = st.sampled_from(
    [
        b"Accept",
        b"accept",
        b"Host",
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Upgrade",
        b"Content-Length",
        b"Expect",
        b"Authorization",
        b"X-Request-Id",
        b"x-request-id",
        b"X-Forwarded-For",
        b"X-Forwarded-Host",
        b"X-Forwarded-Proto",
        b"X-Resilience-Timeout-Ms",
        b"X-Custom",
        b"x-client-hop",
        b"Idempotency-Key",
        b"Proxy-Authorization",
    ]
)
VALUES = st.sampled_from(
    [b"a", b"", b"keep-alive", b"close", b"x-client-hop", b"TE, x-custom", b"\xe2\x82\xac", b"v  "]
)


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(st.tuples(NAMES, VALUES), max_size=12),
    forwarded=st.booleans(),
    request_id=st.booleans(),
    injected=st.booleans(),
    userinfo=st.booleans(),
    remote=st.sampled_from([None, "10.0.0.7"]),
    host=st.sampled_from(["", "proxy.local:8080"]),
    generated=st.sampled_from([None, "0123456789abcdef0123456789abcdef"]),
)
def test_the_block_is_what_the_field_rules_send(
    fields: list[tuple[bytes, bytes]],
    forwarded: bool,
    request_id: bool,
    injected: bool,
    userinfo: bool,
    remote: str | None,
    host: str,
    generated: str | None,
) -> None:
    plan = HeaderPlan.for_upstream(_upstream(forwarded, request_id, injected, userinfo))
    # As the listener decodes them: latin-1, trailing whitespace removed.
    incoming = CIMultiDict(
        [(n.decode("latin-1"), v.rstrip(b" \t").decode("latin-1")) for n, v in fields]
    )
    client = _Client(remote, "http", host)
    expected = build_upstream_headers(incoming, plan, client, generated)
    # Twice: the second answer comes from the plan's memo of names.
    for _ in range(2):
        block = upstream_header_block(fields, incoming, plan, client, generated)
        if isinstance(block, bytes):
            assert block == _serialised(expected)
        else:  # Connection named a field of its own: the general rules themselves
            assert block == expected


def test_the_memo_of_names_is_per_setting() -> None:
    """The same name is kept for one request and dropped for another of the same plan when
    their settings differ (our own X-Request-Id replaces the client's)."""
    plan = HeaderPlan.for_upstream(_upstream(False, True, False, False))
    fields = [(b"X-Request-Id", b"client-id")]
    incoming = CIMultiDict([("X-Request-Id", "client-id")])
    client = _Client(None, "http", "")
    kept = upstream_header_block(fields, incoming, plan, client, None)
    replaced = upstream_header_block(fields, incoming, plan, client, "f" * 32)
    again = upstream_header_block(fields, incoming, plan, client, None)
    assert isinstance(kept, bytes) and isinstance(replaced, bytes)
    assert b"X-Request-Id: client-id\r\n" in kept
    assert b"client-id" not in replaced and b"X-Request-Id: " + b"f" * 32 in replaced
    assert again == kept


def test_a_field_is_copied_byte_for_byte() -> None:
    plan = HeaderPlan.for_upstream(_upstream(False, False, False, False))
    fields = [(b"X-Euro", b"\xe2\x82\xac"), (b"X-Sup", b"\xc2\xb2")]
    incoming = CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for n, v in fields])
    block = upstream_header_block(fields, incoming, plan, _Client(None, "http", ""), None)
    assert block == (
        b"X-Euro: \xe2\x82\xac\r\nX-Sup: \xc2\xb2\r\nHost: api.example:8080\r\n"
        b"Via: 1.1 resilience-proxy\r\n"
    )

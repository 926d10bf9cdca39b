"""Strict request framing (DESIGN §5 "Strict framing" and "Special requests"), over raw
sockets: each vector asserts the proxy's answer, that the connection closed when it must,
and what the upstream received — nothing, or exactly one request with the same body."""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass

import pytest

from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
{EXTRA}
upstreams:
  api: {url: "{URL}"}
routes:
  - {name: api, match: {path_prefix: /api/}, upstream: api}
"""


async def exchange(port: int, data: bytes, *, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send `data`, read until the proxy closes or `wait` passes: (bytes, closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = []
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        try:
            async with asyncio.timeout(wait):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        closed = True
                        break
                    chunks.append(chunk)
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    finally:
        writer.close()
    return b"".join(chunks), closed


def statuses(raw: bytes) -> list[int]:
    """The status of every answer in `raw` (interim ones included), in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


@dataclass(frozen=True)
class Vector:
    name: str
    request: bytes
    status: int
    body: bytes | None = None  # None: the upstream must see nothing; else its one body


H = b"Host: x\r\n"
REFUSED = [
    Vector("cl-and-te", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    Vector("cl-and-te-smuggle", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    Vector("cl-conflicting", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    Vector("cl-repeated", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    Vector("cl-signed", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    Vector("cl-negative", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc", 400),
    Vector("cl-hex", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    Vector("cl-list", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    Vector("cl-inner-space", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc", 400),
    Vector("te-final-gzip", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400),
    Vector("te-chunked-then-gzip", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc", 400),
    Vector("te-identity", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc", 400),
    Vector("te-chunked-twice", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    Vector("te-gzip-chunked", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 501),
    Vector("http10-with-te", b"POST /api/a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    Vector("bare-lf", b"GET /api/a HTTP/1.1\n" + b"Host: x\n\n", 400),
    Vector("bare-lf-in-headers", b"GET /api/a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    Vector("bare-cr", b"GET /api/a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400),
    Vector("obs-fold", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400),
    Vector("nul-in-value", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    Vector("ctl-in-value", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    Vector("del-in-value", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    Vector("space-before-colon", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    Vector("tab-before-colon", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400),
    Vector("empty-field-name", b"GET /api/a HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    Vector("underscore-rejected", b"GET /api/a HTTP/1.1\r\n" + H + b"X_Agent: b\r\n\r\n", 400),
    Vector("http09", b"GET /api/a\r\n\r\n", 400),
    Vector("http20", b"GET /api/a HTTP/2.0\r\n" + H + b"\r\n", 505),
    Vector("http30", b"GET /api/a HTTP/3.0\r\n" + H + b"\r\n", 505),
    Vector("fragment", b"GET /api/a#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    Vector("absolute-form", b"GET http://127.0.0.1/api/a HTTP/1.1\r\n" + H + b"\r\n", 400),
    Vector("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 400),
    Vector("connect", b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n", 400),
    Vector("no-host", b"GET /api/a HTTP/1.1\r\n\r\n", 400),
    Vector("no-host-http10", b"GET /api/a HTTP/1.0\r\n\r\n", 400),
    Vector("two-hosts", b"GET /api/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    Vector("websocket-upgrade", b"GET /api/a HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
    Vector("lowercase-method", b"get /api/a HTTP/1.1\r\n" + H + b"\r\n", 400),
    Vector("space-in-target", b"GET /api/a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    Vector("lowercase-version", b"GET /api/a http/1.1\r\n" + H + b"\r\n", 400),
    Vector("bad-chunk-size", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    Vector("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
]

ACCEPTED = [
    Vector("obs-text-value", b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: \xe2\x82\xac \xff\r\nConnection: close\r\n\r\n", 200, b""),
    Vector("timeout-ms-unicode-digit", b"GET /api/a HTTP/1.1\r\n" + H + b"X-Resilience-Timeout-Ms: \xc2\xb2\r\nConnection: close\r\n\r\n", 200, b""),
    Vector("timeout-ms-5000-digits", b"GET /api/a HTTP/1.1\r\n" + H + b"X-Resilience-Timeout-Ms: " + b"9" * 5000 + b"\r\nConnection: close\r\n\r\n", 200, b""),
    Vector("http12-served-as-11", b"GET /api/a HTTP/1.2\r\n" + H + b"Connection: close\r\n\r\n", 200, b""),
    Vector("cl-trailing-space", b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 3 \r\nConnection: close\r\n\r\nabc", 200, b"abc"),
    Vector("chunked-uppercase", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 200, b"abc"),
    Vector("chunk-extension", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n", 200, b"abc"),
    Vector("chunked-trailer-dropped", b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", 200, b"abc"),
    Vector("leading-empty-line", b"\r\nGET /api/a HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n", 200, b""),
    Vector("h2c-offer-ignored", b"GET /api/a HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: close\r\n\r\n", 200, b""),
]


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, URL=upstream.url, EXTRA="")


@pytest.mark.parametrize("vector", REFUSED, ids=lambda v: v.name)
async def test_refused_before_any_upstream_byte(proxy, upstream, vector):
    raw, closed = await exchange(proxy.port, vector.request)
    assert statuses(raw) == [vector.status], raw[:300]
    assert closed, "the connection stays open after a refused request"
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b'"error"' in body
    assert b"x-request-id: " in head.lower()
    assert upstream.requests == []
    assert upstream.connections == 0


@pytest.mark.parametrize("vector", ACCEPTED, ids=lambda v: v.name)
async def test_accepted_reaches_the_upstream_once_with_the_same_body(proxy, upstream, vector):
    raw, closed = await exchange(proxy.port, vector.request)
    assert statuses(raw) == [vector.status], raw[:300]
    assert closed  # every accepted vector asks to close (or is HTTP/1.0)
    assert len(upstream.requests) == 1
    seen = upstream.requests[0]
    assert seen.body == vector.body
    assert seen.header("X-Resilience-Timeout-Ms") is None
    assert seen.header("Upgrade") is None and seen.header("X-Trailer") is None


async def test_obs_text_is_forwarded_byte_for_byte(proxy, upstream):
    request = b"GET /api/a HTTP/1.1\r\n" + H + b"X-A: \xe2\x82\xac \xff\x80\r\nConnection: close\r\n\r\n"
    upstream.push(Reply(headers=[("X-B", "\xe2\x82\xac\xff")]))
    raw, _ = await exchange(proxy.port, request)
    assert statuses(raw) == [200]
    assert upstream.requests[0].header("X-A").encode("latin-1") == b"\xe2\x82\xac \xff\x80"
    assert b"\r\nX-B: \xe2\x82\xac\xff\r\n" in raw  # and back, untouched


async def test_a_refused_request_after_a_good_one_is_answered_in_turn(proxy, upstream):
    good = b"GET /api/first HTTP/1.1\r\n" + H + b"\r\n"
    bad = b"POST /api/a HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    raw, closed = await exchange(proxy.port, good + bad)
    assert statuses(raw) == [200, 400], (raw, closed)
    assert closed
    assert [r.target for r in upstream.requests] == ["/first"]


@pytest.mark.parametrize(
    ("policy", "forwarded"), [("drop", None), ("allow", "b")], ids=["drop", "allow"]
)
async def test_headers_with_underscores_policy(proxy_factory, upstream, policy, forwarded):
    p = await proxy_factory(CONFIG, URL=upstream.url, EXTRA=f"headers_with_underscores: {policy}")
    raw, _ = await exchange(
        p.port, b"GET /api/a HTTP/1.1\r\n" + H + b"X_Agent: b\r\nConnection: close\r\n\r\n"
    )
    assert statuses(raw) == [200]
    assert upstream.requests[-1].header("X_Agent") == forwarded


async def test_refusals_are_counted_with_an_empty_route(proxy, http):
    labels = ('code="400"', 'outcome="rejected"', 'route=""')

    async def count() -> float:
        async with http.get(proxy.admin + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("resilience_proxy_requests_total{") and all(
                    label in line for label in labels
                ):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = await count()
    await exchange(proxy.port, b"GET /api/a HTTP/1.1\nHost: x\n\n")
    await exchange(proxy.port, b"\x00\x01garbage\r\n\r\n")
    assert await count() == before + 2


SEEDS = [
    b"GET /api/a?x=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    b"POST /api/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"PUT /api/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
]
ALPHABET = b" \t\r\n:;,_#?/\x00\x7f\x80\xff0123456789aAzZ-"


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        op = rng.random()
        if op < 0.4:
            out[at] = rng.choice(ALPHABET)
        elif op < 0.7:
            out.insert(at, rng.choice(ALPHABET))
        else:
            del out[at]
    return bytes(out)


async def test_mutated_requests_never_get_a_5xx_or_smuggle(proxy_factory, upstream):
    """A malformed request gets a 4xx (or 501/505 where DESIGN says so), never a 500; the
    upstream never sees more requests than were answered as forwarded."""
    p = await proxy_factory(
        CONFIG, URL=upstream.url, EXTRA="limits: {client_header_timeout: 300ms, client_body_timeout: 300ms, client_idle_timeout: 300ms}"
    )
    rng = random.Random(20261203)
    cases = [mutate(rng, rng.choice(SEEDS)) for _ in range(240)]
    answered: list[int] = []
    for batch in range(0, len(cases), 40):
        results = await asyncio.gather(
            *(exchange(p.port, case, wait=2.0) for case in cases[batch : batch + 40])
        )
        for case, (raw, _) in zip(cases[batch : batch + 40], results, strict=True):
            codes = statuses(raw)
            assert all(c < 500 or c in (501, 502, 505) for c in codes), (case, raw[:200])
            answered.extend(codes)
    forwarded = sum(1 for c in answered if c in (200, 502))
    assert len(upstream.requests) <= forwarded
    raw, _ = await exchange(p.port, SEEDS[0])  # and the listener is still fine
    assert statuses(raw) == [200]


async def test_after_an_ignored_h2c_offer_the_connection_goes_on_as_http11(proxy, upstream):
    offer = (
        b"GET /api/one HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    then = b"GET /api/two HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    raw, closed = await exchange(proxy.port, offer + then)
    assert statuses(raw) == [200, 200] and closed
    assert [r.target for r in upstream.requests] == ["/one", "/two"]
    assert b"101" not in raw.split(b"\r\n", 1)[0]


async def test_an_h2c_offer_with_a_body_is_refused_whole(proxy, upstream):
    offer = (
        b"POST /api/one HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 38\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    raw, closed = await exchange(proxy.port, offer)
    assert statuses(raw) == [501] and closed
    assert upstream.requests == []


async def test_a_bad_chunk_after_the_head_was_accepted_is_a_400(proxy, upstream):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /api/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the head is handed on and its body awaited
        writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert statuses(raw) == [400]
    assert b'"bad-request"' in raw
    assert upstream.requests == []

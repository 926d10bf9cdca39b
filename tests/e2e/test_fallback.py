"""Cached fallbacks end to end (issue 5): stale answers keep the agent working, safely."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from tests.support.proxy import free_port
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: tok}
upstreams:
  u: {url: "{URL}"}
  keyed: {url: "{URL}", headers: {X-Api-Key: "server-side-key"}}
policies:
  cached:
    timeout: {total: 2s, per_try: 300ms}
    fallback: {stale_if_error: 1h}
routes:
  - {name: c, match: {path_prefix: /c/}, upstream: u, policy: cached}
  - name: b
    match: {path_prefix: /b/}
    upstream: u
    policy: cached
    breaker: {consecutive_failures: 1, open_for: 60s}
  - name: bh
    match: {path_prefix: /bh/}
    upstream: u
    policy: cached
    bulkhead: {max_concurrent: 1, max_queued: 0}
  - name: static
    match: {path_prefix: /static/}
    upstream: u
    policy: cached
    fallback:
      static: {status: 503, headers: {content-type: application/json}, body: '{"data": []}'}
  - name: post
    match: {path_prefix: /post/}
    upstream: u
    policy: cached
    fallback: {methods: [GET, POST]}
  - {name: keyed, match: {path_prefix: /k/}, upstream: keyed, policy: cached}
  - name: small
    match: {path_prefix: /small/}
    upstream: u
    policy: cached
cache: {max_bytes: 1MiB, max_entry_bytes: 300KiB}
"""


@pytest.fixture
async def proxy(proxy_factory, upstream):
    return await proxy_factory(CONFIG, URL=upstream.url)


async def get(http, url, **kw):
    async with http.get(url, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def prime(http, proxy, upstream, path, body=b"fresh", headers=None, request_headers=None):
    upstream.push(Reply(body=body, headers=headers or {"Cache-Control": "max-age=0"}))
    status, _, got = await get(http, proxy.url + path, headers=request_headers or {})
    assert status == 200 and got == body


@pytest.mark.parametrize("failure", [
    Reply(status=500),
    Reply(action="reset-before-head"),
    Reply(action="hang"),
])
async def test_stale_served_when_the_upstream_fails(proxy, upstream, http, failure):
    await prime(http, proxy, upstream, "/c/item?id=1")
    await asyncio.sleep(1.05)
    # Twice: a reset on a reused connection before any response byte is the stale
    # keep-alive race, and a GET is sent once more on a fresh connection (DESIGN §5).
    upstream.push(failure, failure)
    status, headers, body = await get(http, proxy.url + "/c/item?id=1")
    assert status == 200 and body == b"fresh"
    assert headers["X-Resilience-Fallback"] == "stale"
    expected = {500: "upstream-status"}.get(failure.status, None) or (
        "timeout" if failure.action == "hang" else "reset"
    )
    assert headers["X-Resilience-Reason"] == expected
    assert int(headers["Age"]) >= 1
    assert "resilience-proxy" in headers["Cache-Status"]


async def test_stale_served_when_connection_refused(proxy_factory, http, upstream, tmp_path):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    await prime(http, p, upstream, "/c/x")
    await upstream.close()  # now nothing listens there
    status, headers, body = await get(http, p.url + "/c/x")
    assert (status, body) == (200, b"fresh")
    assert headers["X-Resilience-Reason"] == "connect-failure"


async def test_stale_served_when_breaker_open(proxy, upstream, http):
    await prime(http, proxy, upstream, "/b/x")
    upstream.push(Reply(status=500))
    status, headers, _ = await get(http, proxy.url + "/b/x")  # opens the breaker, served stale
    assert headers["X-Resilience-Reason"] == "upstream-status"
    seen = len(upstream.requests)
    status, headers, body = await get(http, proxy.url + "/b/x")
    assert (status, body) == (200, b"fresh")
    assert headers["X-Resilience-Reason"] == "breaker-open"
    assert len(upstream.requests) == seen


async def test_stale_served_when_bulkhead_full(proxy, upstream, http):
    await prime(http, proxy, upstream, "/bh/x")
    upstream.push(Reply(delay=0.5))
    slow = asyncio.create_task(get(http, proxy.url + "/bh/other"))
    await asyncio.sleep(0.1)
    status, headers, body = await get(http, proxy.url + "/bh/x")
    assert (status, body) == (200, b"fresh")
    assert headers["X-Resilience-Reason"] == "bulkhead-full"
    await slow


@pytest.mark.parametrize("directive", ["no-store", "must-revalidate", "no-cache"])
async def test_responses_forbidding_stale_are_never_served(proxy, upstream, http, directive):
    await prime(http, proxy, upstream, "/c/nostale", headers={"Cache-Control": directive})
    upstream.push(Reply(status=500, body=b"err"))
    status, headers, body = await get(http, proxy.url + "/c/nostale")
    assert status == 500 and body == b"err"
    assert "X-Resilience-Fallback" not in headers


async def test_vary_star_never_served(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/vs", headers={"Vary": "*"})
    upstream.push(Reply(status=500))
    status, _, _ = await get(http, proxy.url + "/c/vs")
    assert status == 500


async def test_private_served_only_to_the_same_credentials(proxy, upstream, http):
    alice = {"Authorization": "Bearer alice"}
    bob = {"Authorization": "Bearer bob"}
    await prime(http, proxy, upstream, "/c/me", body=b"alice's data",
                headers={"Cache-Control": "private, max-age=0"}, request_headers=alice)
    upstream.default = Reply(status=500, body=b"err")
    status, _, body = await get(http, proxy.url + "/c/me", headers=alice)
    assert (status, body) == (200, b"alice's data")
    status, _, body = await get(http, proxy.url + "/c/me", headers=bob)
    assert (status, body) == (500, b"err")
    status, _, body = await get(http, proxy.url + "/c/me")
    assert (status, body) == (500, b"err")


async def test_private_anonymous_response_is_not_stored(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/anon", headers={"Cache-Control": "private"})
    upstream.push(Reply(status=500))
    status, _, _ = await get(http, proxy.url + "/c/anon")
    assert status == 500


async def test_two_callers_never_see_each_others_entries(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/shared", body=b"for carol", headers={"Cache-Control": "max-age=0"}, request_headers={"Authorization": "Bearer carol"})
    upstream.default = Reply(status=500)
    status, _, body = await get(http, proxy.url + "/c/shared", headers={"Authorization": "Bearer dave"})
    assert status == 500


@pytest.mark.parametrize("directive", ["s-maxage=0", "proxy-revalidate"])
async def test_shared_only_directives_block_stale_only_for_anonymous(proxy, upstream, http, directive):
    await prime(http, proxy, upstream, "/c/anon-" + directive[:3], headers={"Cache-Control": directive})
    await prime(http, proxy, upstream, "/c/auth-" + directive[:3], headers={"Cache-Control": directive}, request_headers={"Authorization": "Bearer erin"})
    upstream.default = Reply(status=500)
    status, _, _ = await get(http, proxy.url + "/c/anon-" + directive[:3])
    assert status == 500
    status, headers, _ = await get(http, proxy.url + "/c/auth-" + directive[:3],
                                   headers={"Authorization": "Bearer erin"})
    assert status == 200 and headers["X-Resilience-Fallback"] == "stale"


async def test_vary_accept_and_content_codings_stay_apart(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/v", body=b'{"j":1}',
                headers={"Vary": "Accept", "Cache-Control": "max-age=0"}, request_headers={"Accept": "application/json"})
    gz = gzip.compress(b"zipped")
    upstream.push(Reply(body=gz, headers={"Content-Encoding": "gzip", "Cache-Control": "max-age=0"}))
    status, _, body = await get(http, proxy.url + "/c/e", headers={"Accept-Encoding": "gzip"})
    assert body == gz
    upstream.default = Reply(status=500)
    status, _, body = await get(http, proxy.url + "/c/v", headers={"Accept": "application/json"})
    assert (status, body) == (200, b'{"j":1}')
    status, _, _ = await get(http, proxy.url + "/c/v", headers={"Accept": "text/html"})
    assert status == 500
    status, headers, body = await get(http, proxy.url + "/c/e", headers={"Accept-Encoding": "gzip"})
    assert (status, body) == (200, gz) and headers["Content-Encoding"] == "gzip"
    status, _, _ = await get(http, proxy.url + "/c/e", headers={"Accept-Encoding": "identity"})
    assert status == 500


async def test_lru_stays_within_max_bytes(proxy, upstream, http):
    for i in range(12):  # 12 × 200 KiB into a 1 MiB cache
        await prime(http, proxy, upstream, f"/small/{i}", body=bytes([65 + i]) * 200_000)
    async with http.get(proxy.admin + "/status") as resp:
        cache = (await resp.json())["cache"]
    assert cache["bytes"] <= 1024 * 1024
    assert cache["evictions"] >= 7
    upstream.default = Reply(status=500)
    status, _, body = await get(http, proxy.url + "/small/11")
    assert status == 200 and body[:1] == b"L"
    status, _, _ = await get(http, proxy.url + "/small/0")
    assert status == 500
    metrics = await (await http.get(proxy.admin + "/metrics")).text()
    assert "resilience_proxy_cache_evictions_total" in metrics
    assert "resilience_proxy_cache_bytes" in metrics


async def test_body_that_failed_mid_stream_is_never_stored(proxy, upstream, http):
    upstream.push(Reply(body=b"p" * 10_000, action="close-mid-body", headers={"Cache-Control": "max-age=0"}))
    try:
        await get(http, proxy.url + "/c/partial")
    except Exception:
        pass
    upstream.push(Reply(status=500))
    status, _, _ = await get(http, proxy.url + "/c/partial")
    assert status == 500


async def test_static_fallback_when_nothing_is_stored(proxy, upstream, http):
    upstream.push(Reply(status=502))
    status, headers, body = await get(http, proxy.url + "/static/none")
    assert status == 503 and body == b'{"data": []}'
    assert headers["X-Resilience-Fallback"] == "static"
    assert headers["Content-Type"] == "application/json"
    metrics = await (await http.get(proxy.admin + "/metrics")).text()
    assert 'resilience_proxy_fallbacks_total{kind="static",route="static"} 1.0' in metrics


async def test_post_opt_in_is_keyed_by_the_body(proxy, upstream, http):
    upstream.push(Reply(body=b"answer-1", headers={"Cache-Control": "max-age=0"}))
    async with http.post(proxy.url + "/post/infer", data=b'{"q":1}') as resp:
        assert await resp.read() == b"answer-1"
    upstream.default = Reply(status=503)
    async with http.post(proxy.url + "/post/infer", data=b'{"q":1}') as resp:
        assert resp.status == 200 and await resp.read() == b"answer-1"
    async with http.post(proxy.url + "/post/infer", data=b'{"q":2}') as resp:
        assert resp.status == 503


async def test_delete_cache_needs_token_and_clears(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/del")
    async with http.delete(proxy.admin + "/cache?route=c") as resp:
        assert resp.status == 401
    async with http.delete(proxy.admin + "/cache?route=c", headers={"Authorization": "Bearer tok"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["removed"] == 1
    upstream.push(Reply(status=500))
    status, _, _ = await get(http, proxy.url + "/c/del")
    assert status == 500


async def test_injected_credentials_make_it_a_private_cache(proxy, upstream, http):
    await prime(http, proxy, upstream, "/k/me", body=b"mine", headers={"Cache-Control": "private"})
    assert upstream.requests[-1].header("X-Api-Key") == "server-side-key"
    upstream.push(Reply(status=500))
    status, _, body = await get(http, proxy.url + "/k/me")
    assert (status, body) == (200, b"mine")


async def test_unreachable_without_fallback_is_still_502(proxy_factory, http):
    p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{free_port()}")
    status, headers, _ = await get(http, p.url + "/c/never")
    assert status == 502
    assert headers["X-Resilience-Reason"] == "connect-failure"


async def test_head_during_an_outage_gets_the_stale_gets_headers(proxy, upstream, http):
    """RFC 9110 §9.3.2: a HEAD may be answered with the headers a GET would get; during an
    outage that is the stored GET answer, without its body (issue 12 item 10)."""
    body = b'{"items": [1, 2, 3]}'
    await prime(http, proxy, upstream, "/c/listing", body=body,
                headers={"Cache-Control": "max-age=0", "Content-Type": "application/json",
                         "ETag": '"v1"'})
    upstream.default = Reply(status=503)
    status, headers, got = await get(http, proxy.url + "/c/listing")
    assert (status, got) == (200, body)
    async with http.head(proxy.url + "/c/listing") as resp:
        assert resp.status == 200
        assert resp.headers["X-Resilience-Fallback"] == "stale"
        assert resp.headers["X-Resilience-Reason"] == "upstream-status"
        assert resp.headers["Content-Length"] == str(len(body))
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["ETag"] == '"v1"'
        assert await resp.read() == b""
    # the connection is still in step: a GET on it right after gets the whole stale body
    status, _, got = await get(http, proxy.url + "/c/listing")
    assert (status, got) == (200, body)


async def test_head_never_takes_a_get_entry_of_another_caller(proxy, upstream, http):
    await prime(http, proxy, upstream, "/c/mine", body=b"carol's",
                headers={"Cache-Control": "private, max-age=0"},
                request_headers={"Authorization": "Bearer carol"})
    upstream.default = Reply(status=503)
    async with http.head(proxy.url + "/c/mine", headers={"Authorization": "Bearer dave"}) as resp:
        assert resp.status == 503 and "X-Resilience-Fallback" not in resp.headers
    async with http.head(proxy.url + "/c/mine", headers={"Authorization": "Bearer carol"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "7"

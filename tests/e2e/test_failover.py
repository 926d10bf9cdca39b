"""Ordered failover end to end (issue 15, DESIGN §16): three real upstreams on loopback."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.support.proxy import free_port, poll
from tests.support.upstream import Reply, ScriptedUpstream

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: tok}
upstreams:
  a: {url: "{A}/v1", headers: {Authorization: "Bearer token-for-a"}, connect_timeout: 500ms}
  b: {url: "{B}", headers: {X-Api-Key: "key-for-b"}, connect_timeout: 500ms}
  c: {url: "{C}/mirror", connect_timeout: 500ms}
policies:
  api:
    timeout: {total: 3s, per_try: 1s, idle: 500ms}
    breaker: {consecutive_failures: 2, failure_rate: false, open_for: 1s, half_open_calls: 1}
routes:
  - name: fo
    match: {path_prefix: /fo/}
    upstream: a
    policy: api
    failover: {upstreams: [b, c]}
  - name: cached
    match: {path_prefix: /cached/}
    upstream: a
    policy: api
    retry: {max_attempts: 4, backoff: {initial: 10ms, max: 10ms, jitter: none}}
    fallback: {stale_if_error: 1h}
    failover: {upstreams: [b, c]}
  - name: single
    match: {path_prefix: /single/}
    upstream: a
    policy: api
"""


@pytest.fixture
async def trio():
    servers = [await ScriptedUpstream().start() for _ in range(3)]
    yield servers
    for server in servers:
        await server.close()


@pytest.fixture
async def proxy(proxy_factory, trio):
    a, b, c = trio
    return await proxy_factory(CONFIG, A=a.url, B=b.url, C=c.url)


async def get(http, url, **kw):
    async with http.get(url, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


async def metrics(http, proxy) -> str:
    async with http.get(proxy.admin + "/metrics") as resp:
        return await resp.text()


def sample(text: str, series: str) -> float:
    """The value of one exposition line, e.g. `name{a="1",b="2"}` (labels sorted)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def status_route(http, proxy, name):
    async with http.get(proxy.admin + "/status") as resp:
        doc = await resp.json()
    return next(r for r in doc["routes"] if r["name"] == name)


async def test_primary_down_the_secondary_answers_within_one_connect_timeout(
    proxy_factory, trio, http
):
    _, b, c = trio
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = await proxy_factory(CONFIG, A=down, B=b.url, C=c.url)
    b.default = Reply(body=b"from b")
    began = time.monotonic()
    status, headers, body = await get(http, p.url + "/fo/models?x=1")
    assert time.monotonic() - began < 0.5  # the connect timeout of the primary
    assert (status, body) == (200, b"from b")
    assert headers["X-Resilience-Upstream"] == "b"
    assert headers["X-Resilience-Attempts"] == "2"
    assert [r.target for r in b.requests] == ["/models?x=1"]
    assert c.requests == []
    text = await metrics(http, p)
    assert (
        'resilience_proxy_failovers_total{from_upstream="a",reason="connect-failure",'
        'route="fo",to_upstream="b"} 1.0' in text
    )
    assert (
        'resilience_proxy_upstream_attempts_total{result="connect-failure",route="fo",'
        'upstream="a"} 1.0' in text
    )
    assert 'resilience_proxy_upstream_attempts_total{result="ok",route="fo",upstream="b"} 1.0' in text


async def test_each_target_gets_its_own_path_host_and_credentials(proxy, trio, http):
    a, b, c = trio
    a.default = Reply(status=503)
    b.push(Reply(status=502))
    c.default = Reply(body=b"from c")
    status, headers, body = await get(http, proxy.url + "/fo/items/7?q=1")
    assert (status, body, headers["X-Resilience-Upstream"]) == (200, b"from c", "c")
    (seen_a,), (seen_b,), (seen_c,) = a.requests, b.requests, c.requests
    assert seen_a.target == "/v1/items/7?q=1" and seen_a.header("Host") == f"127.0.0.1:{a.port}"
    assert seen_b.target == "/items/7?q=1" and seen_b.header("Host") == f"127.0.0.1:{b.port}"
    assert seen_c.target == "/mirror/items/7?q=1" and seen_c.header("Host") == f"127.0.0.1:{c.port}"
    assert seen_a.header("Authorization") == "Bearer token-for-a"
    assert seen_a.header("X-Api-Key") is None
    # A's token never reaches B or C; B's key never reaches C
    for seen in (seen_b, seen_c):
        assert seen.header("Authorization") is None
        assert all("token-for-a" not in v for _, v in seen.headers)
    assert seen_b.header("X-Api-Key") == "key-for-b"
    assert seen_c.header("X-Api-Key") is None
    text = await metrics(http, proxy)
    for source, to in (("a", "b"), ("b", "c")):
        assert sample(
            text,
            f'resilience_proxy_failovers_total{{from_upstream="{source}",reason="5xx",'
            f'route="fo",to_upstream="{to}"}}',
        ) == 1.0
    assert sample(
        text, 'resilience_proxy_upstream_attempts_total{result="status",route="fo",upstream="b"}'
    ) == 1.0


async def test_the_clients_own_credentials_are_forwarded_but_never_replaced(proxy, trio, http):
    a, b, _ = trio
    a.default = Reply(status=503)
    await get(http, proxy.url + "/fo/x", headers={"X-Api-Key": "the-agents-own"})
    assert a.requests[0].header("X-Api-Key") == "the-agents-own"
    assert b.requests[0].header("X-Api-Key") == "key-for-b"  # the upstream's own wins


async def test_an_open_primary_gets_only_half_open_trials_and_traffic_returns(
    proxy, trio, http
):
    a, b, _ = trio
    a.default = Reply(status=503)
    b.default = Reply(body=b"from b")
    for _ in range(2):  # two failures in a row open a's breaker; b answers both
        status, headers, body = await get(http, proxy.url + "/fo/x")
        assert (status, body, headers["X-Resilience-Upstream"]) == (200, b"from b", "b")
    assert len(a.requests) == 2
    route = await status_route(http, proxy, "fo")
    assert [t["breaker"]["state"] for t in route["targets"]] == ["open", "closed", "closed"]
    assert route["serving"] == "b" and route["targets"][1]["serving"] is True
    opened = time.monotonic()
    for _ in range(5):
        status, headers, _ = await get(http, proxy.url + "/fo/x")
        assert headers["X-Resilience-Upstream"] == "b" and headers["X-Resilience-Attempts"] == "1"
    assert len(a.requests) == 2  # nothing reaches an open primary
    a.default = Reply(body=b"from a")  # it recovers

    async def back_on_a():
        _, headers, _ = await get(http, proxy.url + "/fo/x")
        return headers["X-Resilience-Upstream"] == "a"

    await poll(back_on_a, timeout=3.0, interval=0.05)
    assert time.monotonic() - opened < 1.0 + 0.5  # within the primary's open period
    assert len(a.requests) == 3  # exactly one trial, which closed it
    route = await status_route(http, proxy, "fo")
    assert route["targets"][0]["breaker"]["state"] == "closed" and route["serving"] == "a"
    text = await metrics(http, proxy)
    skipped = sample(
        text,
        'resilience_proxy_failovers_total{from_upstream="a",reason="breaker-open",'
        'route="fo",to_upstream="b"}',
    )
    assert skipped >= 5  # every request while a was open, plus those of the poll
    assert 'resilience_proxy_breaker_state{route="fo",state="closed",upstream="a"} 1.0' in text
    assert 'resilience_proxy_breaker_state{route="fo",state="closed",upstream="b"} 1.0' in text


async def test_every_target_down_serves_the_stale_answer_a_secondary_gave(proxy, trio, http):
    a, b, c = trio
    a.push(Reply(status=503))  # the primary fails once: b's answer is stored under a's key
    b.push(Reply(body=b"from b", headers={"Cache-Control": "max-age=0"}))
    status, headers, body = await get(http, proxy.url + "/cached/list")
    assert (status, body, headers["X-Resilience-Upstream"]) == (200, b"from b", "b")
    for server in trio:
        server.default = Reply(status=503, body=b"down")
    status, headers, body = await get(http, proxy.url + "/cached/list")
    assert (status, body) == (200, b"from b")
    assert headers["X-Resilience-Fallback"] == "stale"
    assert headers["X-Resilience-Upstream"] == "c"  # the last target tried
    assert len(c.requests) >= 1
    text = await metrics(http, proxy)
    # with a retry block, hops count as retries (by their failover.on token)
    assert sample(text, 'resilience_proxy_retries_total{reason="5xx",route="cached"}') >= 3
    assert sample(text, 'resilience_proxy_fallbacks_total{kind="stale",route="cached"}') == 1.0
    # HEAD during the outage gets the GET answer's headers (RFC 9110 §9.3.2)
    async with http.head(proxy.url + "/cached/list") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "6"


async def test_a_post_is_not_failed_over_once_sent_without_the_idempotency_key(
    proxy, trio, http
):
    a, b, c = trio
    a.default = Reply(status=503, body=b"a failed")
    async with http.post(proxy.url + "/fo/infer", data=b'{"q": 1}') as resp:
        assert resp.status == 503 and await resp.read() == b"a failed"
        assert resp.headers["X-Resilience-Upstream"] == "a"
    assert len(a.requests) == 1 and b.requests == [] and c.requests == []
    async with http.post(
        proxy.url + "/fo/infer", data=b'{"q": 2}', headers={"Idempotency-Key": "k1"}
    ) as resp:
        assert resp.status == 200 and resp.headers["X-Resilience-Upstream"] == "b"
    assert b.requests[0].body == b'{"q": 2}'


async def test_a_post_is_failed_over_when_the_primary_refused_the_connection(
    proxy_factory, trio, http
):
    _, b, _ = trio
    p = await proxy_factory(CONFIG, A=f"http://127.0.0.1:{free_port()}", B=b.url, C=trio[2].url)
    async with http.post(p.url + "/fo/infer", data=b'{"q": 3}') as resp:
        assert resp.status == 200 and resp.headers["X-Resilience-Upstream"] == "b"
    assert b.requests[0].body == b'{"q": 3}'


async def test_a_response_that_broke_while_streaming_is_not_retried_on_the_tertiary(
    proxy, trio, http
):
    a, b, c = trio
    a.default = Reply(status=503)
    b.push(Reply(body=b"x" * 200_000, chunked=True, chunks=50, chunk_delay=0.002,
                 action="close-mid-body"))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(proxy.url + "/fo/stream") as resp:
            assert resp.status == 200 and resp.headers["X-Resilience-Upstream"] == "b"
            await resp.read()
    await asyncio.sleep(0.1)
    assert c.requests == []


async def test_all_refused_answers_503_with_retry_after(proxy, trio, http):
    for server in trio:
        server.default = Reply(status=503)
    for _ in range(2):  # each request fails on all three: two requests open all breakers
        status, headers, _ = await get(http, proxy.url + "/fo/x")
        assert status == 503 and headers["X-Resilience-Upstream"] == "c"
    seen = [len(s.requests) for s in trio]
    status, headers, body = await get(http, proxy.url + "/fo/x")
    assert status == 503 and headers["X-Resilience-Reason"] == "breaker-open"
    assert int(headers["Retry-After"]) >= 1
    assert headers["X-Resilience-Upstream"] == "c"
    assert [len(s.requests) for s in trio] == seen  # nothing was sent


async def test_a_route_without_failover_has_no_upstream_header(proxy, trio, http):
    status, headers, _ = await get(http, proxy.url + "/single/x")
    assert status == 200 and "X-Resilience-Upstream" not in headers


RELOAD_ONE_TARGET = CONFIG.replace("failover: {upstreams: [b, c]}\n  - name: cached",
                                   "failover: {upstreams: [b]}\n  - name: cached")


async def test_reload_keeps_each_targets_breaker_and_drops_a_removed_target(
    proxy, trio, http
):
    a, b, c = trio
    for server in trio:
        server.default = Reply(status=503)
    for _ in range(2):  # a, b and c all open for route fo
        await get(http, proxy.url + "/fo/x")
    route = await status_route(http, proxy, "fo")
    assert [t["breaker"]["state"] for t in route["targets"]] == ["open"] * 3
    # an edit elsewhere keeps every target's breaker
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace("total: 3s", "total: 4s"))
    async with http.post(proxy.admin + "/reload", headers={"Authorization": "Bearer tok"}) as r:
        assert (await r.json())["result"] == "ok"
    route = await status_route(http, proxy, "fo")
    assert [t["breaker"]["state"] for t in route["targets"]] == ["open"] * 3
    # removing c drops its state; adding it back starts it closed
    proxy.config_path.write_text(
        text.replace("failover: {upstreams: [b, c]}\n  - name: cached",
                     "failover: {upstreams: [b]}\n  - name: cached")
    )
    async with http.post(proxy.admin + "/reload", headers={"Authorization": "Bearer tok"}) as r:
        assert (await r.json())["result"] == "ok"
    route = await status_route(http, proxy, "fo")
    assert [t["upstream"] for t in route["targets"]] == ["a", "b"]
    assert ("fo", "c") not in proxy.app.registry.breakers
    assert ("fo", "a") in proxy.app.registry.breakers
    proxy.config_path.write_text(text)
    async with http.post(proxy.admin + "/reload", headers={"Authorization": "Bearer tok"}) as r:
        assert (await r.json())["result"] == "ok"
    route = await status_route(http, proxy, "fo")
    assert [t["breaker"]["state"] for t in route["targets"]] == ["open", "open", "closed"]


async def test_an_operator_can_force_one_target_open_to_move_its_traffic(proxy, trio, http):
    a, b, _ = trio
    token = {"Authorization": "Bearer tok"}
    async with http.post(proxy.admin + "/breakers/fo/open?upstream=a", headers=token) as resp:
        body = await resp.json()
        assert resp.status == 200
        assert [(x["upstream"], x["state"]) for x in body["breakers"]] == [("a", "forced_open")]
    status, headers, _ = await get(http, proxy.url + "/fo/x")
    assert status == 200 and headers["X-Resilience-Upstream"] == "b" and a.requests == []
    route = await status_route(http, proxy, "fo")
    assert [t["breaker"]["state"] for t in route["targets"]] == ["forced_open", "closed", "closed"]
    async with http.post(proxy.admin + "/breakers/fo/reset?upstream=a", headers=token) as resp:
        assert resp.status == 200
    _, headers, _ = await get(http, proxy.url + "/fo/x")
    assert headers["X-Resilience-Upstream"] == "a"
    async with http.post(proxy.admin + "/breakers/fo/open?upstream=zz", headers=token) as resp:
        assert resp.status == 404


async def test_a_secondarys_redirect_is_rewritten_against_its_own_url(proxy, trio, http):
    a, b, c = trio
    a.default = Reply(status=503)
    b.push(Reply(status=302, headers={"Location": f"{b.url}/next?page=2"}, body=b""))
    async with http.get(proxy.url + "/fo/list", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["X-Resilience-Upstream"] == "b"
        assert resp.headers["Location"] == "/fo/next?page=2"
    a.push(Reply(status=503))
    c.push(Reply(status=302, headers={"Location": f"{c.url}/mirror/other"}, body=b""))
    b.push(Reply(status=503))
    async with http.get(proxy.url + "/fo/list", allow_redirects=False) as resp:
        assert resp.headers["X-Resilience-Upstream"] == "c"
        assert resp.headers["Location"] == "/fo/other"


async def test_a_slow_primary_hands_over_after_its_attempt_timeout(proxy_factory, trio, http):
    a, b, c = trio
    p = await proxy_factory(CONFIG.replace("per_try: 1s", "per_try: 200ms"),
                            A=a.url, B=b.url, C=c.url)
    a.default = Reply(action="hang")
    b.default = Reply(body=b"from b")
    began = time.monotonic()
    status, headers, body = await get(http, p.url + "/fo/x")
    assert (status, body, headers["X-Resilience-Upstream"]) == (200, b"from b", "b")
    assert 0.19 <= time.monotonic() - began < 0.8
    await poll(lambda: a.cancelled == 1)  # the primary's attempt was cancelled, not leaked


TLS_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  untrusted: {url: "{TLS}", connect_timeout: 1s}
  trusted: {url: "{TLS}", tls: {ca_file: "{CA}"}, connect_timeout: 1s}
routes:
  - name: tls
    match: {path_prefix: /tls/}
    upstream: untrusted
    failover: {upstreams: [trusted]}
"""


async def test_each_target_has_its_own_tls_settings(proxy_factory, tls_upstream, ca_file, http):
    # the primary does not trust the private CA (certificate verify failure: connect-failure);
    # the secondary names it in ca_file and gets through to the same server
    tls_upstream.default = Reply(body=b"over tls")
    p = await proxy_factory(TLS_CONFIG, TLS=tls_upstream.url, CA=ca_file)
    status, headers, body = await get(http, p.url + "/tls/x")
    assert (status, body, headers["X-Resilience-Upstream"]) == (200, b"over tls", "trusted")
    assert len(tls_upstream.requests) == 1
    text = await metrics(http, p)
    assert sample(
        text,
        'resilience_proxy_upstream_attempts_total{result="connect-failure",route="tls",'
        'upstream="untrusted"}',
    ) == 1.0

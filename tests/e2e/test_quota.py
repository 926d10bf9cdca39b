"""Provider quotas and local rate limits end to end (DESIGN §14): a metered upstream that
counts its quota down with each provider's headers; with the proxy in front it never has to
refuse, because nothing reaches it between exhaustion and the reset."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.support.provider import MeteredProvider
from tests.support.proxy import poll
from tests.support.upstream import Reply, ScriptedUpstream

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  metered: {url: "{URL}", quota: {headers: {KIND}, reserve: {RESERVE}}}
routes:
  - name: api
    match: {path_prefix: /api/}
    upstream: metered
    timeout: {total: 10s, per_try: 5s}
  - name: cached
    match: {path_prefix: /cached/}
    upstream: metered
    timeout: {total: 10s, per_try: 5s}
    fallback: {on: [quota, 5xx]}
"""


async def metric(http, proxy, name: str, **labels: str) -> float | None:
    async with http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("kind", ["github", "cloudinary", "huggingface", "ietf", "generic"])
async def test_nothing_reaches_the_provider_between_exhaustion_and_the_reset(
    proxy_factory, upstream, http, kind
):
    provider = MeteredProvider(kind, limit=3, window=1.0)
    upstream.default = provider
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND=kind, RESERVE=0)
    statuses = []
    for i in range(7):
        async with http.get(f"{proxy.url}/api/item/{i}") as resp:
            statuses.append(resp.status)
            await resp.read()
    assert statuses == [200] * 7  # the ones beyond the quota waited for the reset
    # the provider refuses anything sent before its reset: the proxy held them back instead
    assert provider.refused == 0
    assert provider.served == 7


async def test_the_reserve_is_kept_and_a_reset_beyond_the_timeout_is_a_429(
    proxy_factory, upstream, http
):
    provider = MeteredProvider("github", limit=5, window=30.0)
    upstream.default = provider
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND="github", RESERVE=2)
    for i in range(3):
        async with http.get(f"{proxy.url}/api/{i}") as resp:
            assert resp.status == 200
    async with http.get(f"{proxy.url}/api/held", headers={"X-Resilience-Timeout-Ms": "300"}) as resp:
        body = await resp.json()
        assert resp.status == 429
        assert resp.headers["X-Resilience-Reason"] == "quota"
        assert 1 <= int(resp.headers["Retry-After"]) <= 32
        assert body["error"]["reason"] == "quota"
    assert provider.served == 3 and provider.refused == 0  # remaining 2 = the reserve: kept
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="api", source="quota") == 1
    assert await metric(http, proxy, "resilience_proxy_requests_total", route="api", outcome="quota", code="429") == 1
    assert await metric(http, proxy, "resilience_proxy_upstream_quota_remaining", upstream="metered") == 2
    reset = await metric(http, proxy, "resilience_proxy_upstream_quota_reset_seconds", upstream="metered")
    assert reset is not None and 0 < reset <= 31
    async with http.get(proxy.admin + "/status") as resp:
        status = await resp.json()
    quota = next(u for u in status["upstreams"] if u["name"] == "metered")["quota"]
    assert quota["headers"] == "github" and quota["reserve"] == 2
    assert quota["remaining"] == 2 and quota["limit"] == 5


async def test_queued_requests_are_released_at_the_reset_in_order(proxy_factory, upstream, http):
    provider = MeteredProvider("generic", limit=3, window=1.0)
    upstream.default = provider
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND="generic", RESERVE=0)
    # three pooled connections, and the quota spent
    warm = [http.get(f"{proxy.url}/api/warm/{i}") for i in range(3)]
    for resp in await asyncio.gather(*warm):
        await resp.read()
        resp.release()
    assert provider.remaining == 0

    async def one(i: int) -> tuple[int, float]:
        async with http.get(f"{proxy.url}/api/queued/{i}") as resp:
            await resp.read()
            return resp.status, time.time()

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(one(i)))
        await poll(lambda i=i: proxy.app.registry.quotas["metered"].queued == i + 1)
    results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200, 200, 200]
    assert provider.refused == 0
    assert [target for _, target in provider.served_at[3:]] == [f"/queued/{i}" for i in range(3)]


async def test_a_quota_refusal_serves_the_stored_fallback_when_fallback_on_lists_quota(
    proxy_factory, upstream, http
):
    provider = MeteredProvider("ietf", limit=1, window=30.0)
    upstream.default = provider
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND="ietf", RESERVE=0)
    async with http.get(f"{proxy.url}/cached/doc") as resp:
        assert resp.status == 200
        fresh = await resp.read()
    async with http.get(f"{proxy.url}/cached/doc", headers={"X-Resilience-Timeout-Ms": "200"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Resilience-Fallback"] == "stale"
        assert resp.headers["X-Resilience-Reason"] == "quota"
        assert await resp.read() == fresh
    assert provider.served == 1 and provider.refused == 0


async def test_an_upstream_refusal_is_counted_as_source_upstream(proxy_factory, upstream, http):
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND="generic", RESERVE=0)
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="api", source="upstream") == 0
    upstream.push(Reply(429, {"Retry-After": "1"}, b"slow down"))
    async with http.get(f"{proxy.url}/api/x", headers={"X-Resilience-Timeout-Ms": "500"}) as resp:
        assert resp.status == 429
        assert await resp.read() == b"slow down"
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="api", source="upstream") == 1


RATE_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  u: {url: "{URL}"}
routes:
  - name: agents
    match: {path_prefix: /agents/}
    upstream: u
    rate_limit: {rps: 0.5, burst: 2, per: "header:X-Agent-Id"}
    fallback: {on: [5xx], static: {status: 200, body: "static"}}
  - name: whole
    match: {path_prefix: /whole/}
    upstream: u
    rate_limit: {rps: 0.5, burst: 1}
"""


async def test_a_caller_over_its_rate_gets_429_while_another_caller_is_fine(
    proxy_factory, upstream, http
):
    proxy = await proxy_factory(RATE_CONFIG, URL=upstream.url)
    greedy = {"X-Agent-Id": "agent-1"}
    codes = []
    for _ in range(4):
        async with http.get(f"{proxy.url}/agents/x", headers=greedy) as resp:
            codes.append(resp.status)
            if resp.status == 429:
                assert resp.headers["X-Resilience-Reason"] == "rate-limited"
                assert resp.headers["Retry-After"] == "2"  # a token every 2 s
                assert "X-Resilience-Fallback" not in resp.headers  # never replaced
                assert (await resp.json())["error"]["reason"] == "rate-limited"
    assert codes == [200, 200, 429, 429]
    async with http.get(f"{proxy.url}/agents/x", headers={"X-Agent-Id": "agent-2"}) as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 3  # refused requests never reached the upstream
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="agents", source="local") == 2
    assert await metric(http, proxy, "resilience_proxy_requests_total", route="agents", outcome="rate-limited", code="429") == 2


async def test_a_route_wide_limit_applies_to_everyone(proxy_factory, upstream, http):
    proxy = await proxy_factory(RATE_CONFIG, URL=upstream.url)
    async with http.get(f"{proxy.url}/whole/x", headers={"X-Agent-Id": "a"}) as resp:
        assert resp.status == 200
    async with http.get(f"{proxy.url}/whole/x", headers={"X-Agent-Id": "b"}) as resp:
        assert resp.status == 429


async def test_rate_limit_state_survives_a_reload_and_goes_with_its_route(
    proxy_factory, upstream, http
):
    proxy = await proxy_factory(RATE_CONFIG, URL=upstream.url)
    async with http.get(f"{proxy.url}/whole/x") as resp:
        assert resp.status == 200
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace("burst: 1}", "burst: 1}\n    strip_prefix: true"))
    assert (await proxy.app.reload("admin"))[0] == "ok"
    async with http.get(f"{proxy.url}/whole/x") as resp:
        assert resp.status == 429  # the bucket was kept: still empty
    proxy.config_path.write_text(text.split("  - name: whole")[0])
    assert (await proxy.app.reload("admin"))[0] == "ok"
    assert "whole" not in proxy.app.registry.buckets


PROVIDER_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  gh: {url: "{URL}", quota: {headers: github}}
  hf: {url: "{URL}", quota: {headers: huggingface}}
routes:
  - name: github
    match: {path_prefix: /github/}
    upstream: gh
    timeout: {total: 10s, per_try: 5s}
  - name: inference
    match: {path_prefix: /hf/}
    upstream: hf
    timeout: {total: 10s, per_try: 5s}
    retry: {max_attempts: 3, backoff: {initial: 10ms, max: 20ms}}
"""

SECONDARY = b'{"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.", "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits"}'


async def test_a_github_secondary_limit_pauses_only_that_credential(proxy_factory, upstream, http):
    proxy = await proxy_factory(PROVIDER_CONFIG, URL=upstream.url)
    upstream.push(Reply(403, {"content-type": "application/json", "x-ratelimit-remaining": "4999"}, SECONDARY))
    alice = {"Authorization": "token alice"}
    async with http.get(f"{proxy.url}/github/repos/o/r", headers=alice) as resp:
        assert resp.status == 403
        assert await resp.read() == SECONDARY  # read to find the message, still relayed whole
    async with http.get(f"{proxy.url}/github/repos/o/r", headers={**alice, "X-Resilience-Timeout-Ms": "500"}) as resp:
        assert resp.status == 429
        assert resp.headers["X-Resilience-Reason"] == "quota"
        assert resp.headers["Retry-After"] == "60"  # no retry-after: GitHub asks for a minute
    async with http.get(f"{proxy.url}/github/repos/o/r", headers={"Authorization": "token bob"}) as resp:
        assert resp.status == 200  # another credential is not paused
    assert len(upstream.requests) == 2
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="github", source="upstream") == 1
    assert await metric(http, proxy, "resilience_proxy_rate_limited_total", route="github", source="quota") == 1


async def test_a_huggingface_model_loading_503_is_retried_after_estimated_time(
    proxy_factory, upstream, http
):
    proxy = await proxy_factory(PROVIDER_CONFIG, URL=upstream.url)
    loading = Reply(503, {"content-type": "application/json"}, b'{"error": "Model x is currently loading", "estimated_time": 0.4}')
    upstream.push(loading)
    async with http.post(f"{proxy.url}/hf/models/x", data=b'{"inputs": "hi"}') as resp:
        assert resp.status == 503  # a POST without an idempotency key is never repeated
    assert len(upstream.requests) == 1
    upstream.push(loading)
    headers = {"Idempotency-Key": "k-1"}
    async with http.post(f"{proxy.url}/hf/models/x", data=b'{"inputs": "hi"}', headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Resilience-Attempts"] == "2"
    waited = upstream.requests[2].at - upstream.requests[1].at
    assert waited >= 0.4  # estimated_time, not the 10 ms backoff


FAILOVER_CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  primary: {url: "{URL}", quota: {headers: generic}}
  backup: {url: "{BACKUP}"}
routes:
  - name: fo
    match: {path_prefix: /fo/}
    upstream: primary
    timeout: {total: 10s, per_try: 5s}
    failover: {upstreams: [backup], on: [connect-failure, 5xx, quota]}
"""


async def test_a_spent_primary_is_skipped_for_the_next_target_at_no_cost(proxy_factory, upstream, http):
    backup = await ScriptedUpstream().start()
    try:
        upstream.default = Reply(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"}, b"primary")
        backup.default = Reply(200, {}, b"backup")
        proxy = await proxy_factory(FAILOVER_CONFIG, URL=upstream.url, BACKUP=backup.url)
        async with http.get(f"{proxy.url}/fo/x") as resp:
            assert await resp.read() == b"primary"
        async with http.get(f"{proxy.url}/fo/x") as resp:
            # the primary's quota is spent for 30 s: the backup answers at once, not in 30 s
            assert await resp.read() == b"backup"
            assert resp.headers["X-Resilience-Upstream"] == "backup"
            assert resp.headers["X-Resilience-Attempts"] == "1"  # the refusal cost no attempt
        assert len(upstream.requests) == 1 and len(backup.requests) == 1
    finally:
        await backup.close()


async def test_quota_state_survives_a_reload_and_goes_with_its_quota(proxy_factory, upstream, http):
    upstream.default = Reply(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"})
    proxy = await proxy_factory(CONFIG, URL=upstream.url, KIND="generic", RESERVE=0)
    async with http.get(f"{proxy.url}/api/a") as resp:
        assert resp.status == 200
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace("per_try: 5s}", "per_try: 4s}"))
    assert (await proxy.app.reload("admin"))[0] == "ok"
    async with http.get(f"{proxy.url}/api/b", headers={"X-Resilience-Timeout-Ms": "300"}) as resp:
        assert resp.status == 429  # still known to be spent after the reload
    proxy.config_path.write_text(text.replace(", quota: {headers: generic, reserve: 0}", ""))
    assert (await proxy.app.reload("admin"))[0] == "ok"
    assert proxy.app.registry.quotas == {}
    async with http.get(f"{proxy.url}/api/c", headers={"X-Resilience-Timeout-Ms": "300"}) as resp:
        assert resp.status == 200  # no quota configured: nothing held back
    assert len(upstream.requests) == 2

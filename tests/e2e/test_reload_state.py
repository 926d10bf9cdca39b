"""Reload keeps what must survive and releases what was removed (DESIGN §2)."""

from __future__ import annotations

from tests.support.proxy import poll
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  a: {url: "{URL}"}
  b: {url: "{URL}/b"}
routes:
  - name: ra
    match: {path_prefix: /a/}
    upstream: a
    breaker: {consecutive_failures: 3, failure_rate: {threshold: 50%, window_calls: 10, min_calls: 5}}
    retry: {max_attempts: 2, backoff: {initial: 1ms}}
  - name: rb
    match: {path_prefix: /b/}
    upstream: b
    fallback: {stale_if_error: 1h}
"""


async def test_removed_route_and_upstream_are_released_kept_state_survives(proxy_factory, upstream, http):
    p = await proxy_factory(CONFIG, URL=upstream.url)
    upstream.push(Reply(status=503), Reply(status=503))
    async with http.get(p.url + "/a/x") as resp:  # two failed attempts: one short of opening
        assert resp.status == 503
    upstream.push(Reply(headers={"Cache-Control": "max-age=0"}))
    async with http.get(p.url + "/b/x") as resp:
        assert resp.status == 200
    breaker = p.app.registry.breakers[("ra", "a")]
    client_b = p.app.registry.clients["b"]
    assert breaker.snapshot()["consecutive_failures"] == 2
    assert p.app.store.entries == 1

    # Drop route rb and upstream b; change ra's threshold but not its window's shape.
    new = CONFIG.split("  - name: rb")[0].replace("  b: {url: \"{URL}/b\"}\n", "").replace(
        "consecutive_failures: 3", "consecutive_failures: 4"
    )
    p.config_path.write_text(new.replace("{PORT}", str(p.port)).replace("{ADMIN_PORT}", str(p.admin_port)).replace("{URL}", upstream.url))
    result, problems = await p.app.reload("admin")
    assert (result, problems) == ("ok", [])
    assert p.app.registry.breakers[("ra", "a")] is breaker  # same state object, new policy
    assert breaker.snapshot()["consecutive_failures"] == 2
    assert "b" not in p.app.registry.clients
    await poll(lambda: client_b.closed and client_b.open_connections == 0, timeout=3)  # pool closed once idle
    assert p.app.store.entries == 0  # the removed route's fallbacks are dropped
    async with http.get(p.url + "/b/x") as resp:
        assert resp.status == 404
    upstream.push(Reply(status=503), Reply(status=503))
    async with http.get(p.url + "/a/x") as resp:  # 3rd and 4th failures open it (new policy)
        assert resp.status == 503
    assert breaker.snapshot()["state"] == "open"

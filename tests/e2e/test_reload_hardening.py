"""Reloading hostile or broken files on a live proxy (issue 12 items 1-3, 5; issue 13 item 8).

The proxy keeps serving the old config, `/healthz` keeps answering while a slow file is
parsed (in a worker thread), every failure is counted, logged and rejected, the file
watcher survives anything, and a rotated `${file:PATH}` secret is picked up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from tests.support.proxy import poll, render
from tests.support.upstream import Reply

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}, token: admin-token-1234}
upstreams:
  u:
    url: "{URL}"
    headers: {X-Note: "5 € für Zoë", Authorization: "Bearer {AUTH}"}
routes:
  - {name: r, match: {path_prefix: /r/}, upstream: u}
"""
AUTH = {"Authorization": "Bearer admin-token-1234"}


async def start(proxy_factory, upstream, tmp_path: Path, auth: str = "literal-token", **kw):
    (tmp_path / "token").write_text("first-token-aaaa\n")
    return await proxy_factory(CONFIG, URL=upstream.url, AUTH=auth, **kw)


def rewrite(p, text: str, **values: object) -> None:
    p.config_path.write_text(render(text, p.port, p.admin_port, **values))


async def reload_errors(http, p) -> float:
    async with http.get(p.admin + "/metrics") as resp:
        text = await resp.text()
    match = re.search(r'^resilience_proxy_config_reloads_total\{result="error"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_injected_header_values_reach_the_upstream_as_utf8_bytes(
    proxy_factory, upstream, http, tmp_path
):
    p = await start(proxy_factory, upstream, tmp_path)
    async with http.get(p.url + "/r/x") as resp:
        assert resp.status == 200  # today: 500 on every request of this route
    seen = upstream.requests[-1]
    assert seen.header("X-Note").encode("latin-1") == "5 € für Zoë".encode()
    assert seen.header("Authorization") == "Bearer literal-token"


async def test_every_unloadable_file_is_a_counted_rejected_reload(
    proxy_factory, upstream, http, tmp_path, caplog
):
    p = await start(proxy_factory, upstream, tmp_path)
    good = p.config_path.read_text()
    variants = {
        "nul": good.replace("routes:", "routes:\0"),
        "deep": "x: " + "[" * 600 + "]" * 600 + "\n" + good,
        "digits": good.replace("version: 1", "version: " + "9" * 5000),
        "dev-zero": good.replace("admin: {", "admin: {token_file: /dev/zero, "),
        "empty": "",
        "null": "~\n",
        "bomb": "x:\n  a0: &a0 [x]\n"
        + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
        + good,
    }
    caplog.set_level(logging.ERROR, logger="resilience_proxy")
    for count, (name, text) in enumerate(variants.items(), start=1):
        p.config_path.write_text(text)
        async with http.post(p.admin + "/reload", headers=AUTH) as resp:
            assert resp.status == 422, name
            body = await resp.json()
        assert body["result"] == "error" and body["problems"], name
        assert all(line.startswith(str(p.config_path)) for line in body["problems"]), body
        assert await reload_errors(http, p) == count, name
        async with http.get(p.url + "/r/x") as resp:  # the old config keeps serving
            assert resp.status == 200, name
    failures = [r for r in caplog.records if r.getMessage() == "config_reload_failed"]
    assert len(failures) == len(variants)


async def test_healthz_answers_within_100ms_while_a_slow_file_is_parsed(
    proxy_factory, upstream, http, tmp_path
):
    p = await start(proxy_factory, upstream, tmp_path)
    # Just under the caps: about a second of pure-Python YAML parsing, then refused.
    p.config_path.write_text("x: [" + ", ".join(["1"] * 60_000) + "]\n")
    # A blocked loop is slow on every try; a machine busy with other work, once at most.
    for _ in range(3):
        latencies, result, problems = await reload_polling_healthz(p, http)
        if max(latencies) < 0.1:
            break
    assert max(latencies) < 0.1, sorted(latencies)[-3:]
    assert len(latencies) >= 5  # the parse took a while: the loop kept answering meanwhile
    assert result == "error" and problems == [f"{p.config_path}:1: more than 50000 values"]


async def reload_polling_healthz(p, http):
    reload = asyncio.ensure_future(p.app.reload("admin"))
    latencies = []
    while not reload.done():
        began = time.perf_counter()
        async with http.get(p.admin + "/healthz") as resp:
            assert resp.status == 200
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.01)
    result, problems = await reload
    return latencies, result, problems


async def test_watcher_survives_a_nul_byte_file_and_picks_up_the_next_edit(
    proxy_factory, upstream, http, tmp_path
):
    p = await start(proxy_factory, upstream, tmp_path, watch_interval=0.05)
    good = p.config_path.read_text()
    p.config_path.write_text(good.replace("routes:", "routes:\0"))
    await poll(lambda: reload_errors(http, p), timeout=5)
    assert p.app.config.routes[0].match.path_prefix == "/r/"
    p.config_path.write_text(good.replace("/r/", "/moved/"))
    await poll(lambda: p.app.config.routes[0].match.path_prefix == "/moved/", timeout=5)
    async with http.get(p.url + "/moved/x") as resp:
        assert resp.status == 200
    assert await reload_errors(http, p) == 1  # the rejected file was not retried meanwhile


async def test_a_rotated_secret_file_is_picked_up_without_a_restart(
    proxy_factory, upstream, http, tmp_path
):
    p = await start(proxy_factory, upstream, tmp_path, "${file:token}", watch_interval=0.05)
    async with http.get(p.url + "/r/x") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].header("Authorization") == "Bearer first-token-aaaa"
    first = p.app.config.hash
    (tmp_path / "token").write_text("second-token-bbbb\n")
    await poll(lambda: p.app.config.hash != first, timeout=5)
    async with http.get(p.url + "/r/x") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].header("Authorization") == "Bearer second-token-bbbb"
    async with http.get(p.admin + "/config") as resp:
        text = await resp.text()
    assert "second-token-bbbb" not in text and "first-token-aaaa" not in text
    # A secret file that disappears is a rejected reload; the last good token keeps working.
    (tmp_path / "token").unlink()
    await poll(lambda: reload_errors(http, p), timeout=5)
    async with http.get(p.url + "/r/x") as resp:
        assert resp.status == 200
    assert upstream.requests[-1].header("Authorization") == "Bearer second-token-bbbb"


async def test_warnings_are_logged_on_reload_and_do_not_fail_it(
    proxy_factory, upstream, http, tmp_path, caplog
):
    p = await start(proxy_factory, upstream, tmp_path)
    text = p.config_path.read_text() + "  - {name: hidden, match: {path_prefix: /r/x/}, upstream: u}\n"
    p.config_path.write_text(text)
    caplog.set_level(logging.WARNING, logger="resilience_proxy")
    result, _ = await p.app.reload("admin")
    assert result == "ok"
    warnings = [r for r in caplog.records if r.getMessage() == "config_warning"]
    assert len(warnings) == 1
    assert "routes[1]: warning: never matches: routes[0] (r)" in warnings[0].fields["problem"]  # type: ignore[attr-defined]
    upstream.push(Reply(status=201))
    async with http.get(p.url + "/r/x/y") as resp:
        assert resp.status == 201

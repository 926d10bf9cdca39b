"""The status page at GET / on the admin listener (DESIGN §8), rendered by a real headless
Chromium.

Two servers feed it: a tiny aiohttp app that mounts the real `status_page` handler (same
HTML, same CSP) under a path prefix next to a canned `/status` document, which pins every
rendering rule; and the real proxy (`python -m proxy run`) with one breaker forced open
through the admin API. Screenshots at laptop and phone width go to `test-artifacts/`.

Chromium comes from $CHROMIUM or `chromium` on PATH. Without it the tests skip loudly,
except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import struct
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server.admin import status_page

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_TIMEOUT = 60.0
DESKTOP = (1280, 900)
PHONE = (390, 844)
# A blank 1280x900 page compresses to about 5 KB; the rendered page is several times that.
MIN_PNG_BYTES = {DESKTOP: 30_000, PHONE: 15_000}


# -- the browser ---------------------------------------------------------------------------


def chromium_path() -> str:
    """$CHROMIUM if set (a name or a path), else `chromium` or `chromium-browser` on PATH."""
    wanted = os.environ.get("CHROMIUM")
    found = shutil.which(wanted) if wanted else None
    if not wanted:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = (
        "!!! Chromium not found (set $CHROMIUM or install `chromium`): the status page "
        "browser tests did NOT run !!!"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Browser:
    binary: str
    profile_root: Path
    runs: int = 0

    async def run(self, url: str, *extra: str) -> str:
        """Run headless Chromium once on `url` with 5 s of virtual time (the page polls every
        2 s, so it fetches /status three times); return stdout. Killed after 60 s."""
        self.runs += 1
        profile = self.profile_root / f"profile-{self.runs}"
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ]
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its zygote and renderers share our process group id
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise AssertionError(
                f"chromium did not finish within {CHROMIUM_TIMEOUT}s: {url}"
            ) from None
        assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
        return out.decode()

    async def dom(self, url: str, size: tuple[int, int] = DESKTOP) -> Node:
        html = await self.run(url, f"--window-size={size[0]},{size[1]}", "--dump-dom")
        assert "<html" in html, f"chromium printed no DOM for {url}"
        return parse(html)

    async def screenshot(self, url: str, name: str, size: tuple[int, int]) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.unlink(missing_ok=True)
        await self.run(url, f"--window-size={size[0]},{size[1]}", f"--screenshot={path}")
        assert path.exists(), f"chromium wrote no screenshot for {url}"
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    return Browser(chromium_path(), tmp_path)


def assert_png(path: Path, size: tuple[int, int]) -> None:
    """A real PNG of the requested viewport size with more in it than an empty page."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == size, f"{path}: {width}x{height}, wanted {size}"
    assert len(data) >= MIN_PNG_BYTES[size], f"{path}: only {len(data)} bytes, page looks empty"


# -- a small DOM for assertions on --dump-dom output ----------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The text content, whitespace collapsed, a space between text nodes (entities are
        already decoded)."""
        parts: list[str] = []

        def walk(node: Node) -> None:
            for child in node.children:
                if isinstance(child, str):
                    parts.append(child)
                else:
                    walk(child)

        walk(self)
        return " ".join(" ".join(parts).split())

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def hidden(self) -> bool:
        return "hidden" in self.attrs

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, predicate: Callable[[Node], bool]) -> list[Node]:
        return [n for n in self.iter() if predicate(n)]

    def by_attr(self, name: str, value: str | None = None) -> list[Node]:
        return self.find_all(
            lambda n: name in n.attrs and (value is None or n.attrs[name] == value)
        )

    def one(self, name: str, value: str) -> Node:
        found = self.by_attr(name, value)
        assert len(found) == 1, f"expected one element with {name}={value!r}, got {len(found)}"
        return found[0]

    def by_id(self, value: str) -> Node:
        return self.one("id", value)

    def by_class(self, cls: str) -> list[Node]:
        return self.find_all(lambda n: cls in n.classes)

    def by_tag(self, tag: str) -> list[Node]:
        return self.find_all(lambda n: n.tag == tag)


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# -- a canned /status behind a path prefix --------------------------------------------------

XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
HASH = "3f1c9a7be4d2" + "0" * 52


def breaker(state: str, **values: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "state": state, "mode": "enforce", "forced": False, "failure_rate": 0.0,
        "slow_rate": 0.0, "calls": 0, "consecutive_failures": 0, "open_for": 60.0,
        "seconds_until_half_open": None, "half_open_permits_in_use": 0,
        "half_open_successes": 0,
    }  # fmt: skip
    snap.update(values)
    return snap


def route(name: str, br: dict[str, Any] | None, **values: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "upstream": "api",
        "match": {"path_prefix": f"/{name}/", "host": None, "methods": None},
        "stages": ["timeout", "retry", "breaker"] if br else ["timeout"],
        "breaker": br,
        "bulkhead": None,
        "last_minute": {"requests": 0, "retries": 0, "fallbacks": 0, "failures": 0},
        "cache": {"entries": 0, "bytes": 0},
    }
    doc.update(values)
    return doc


CANNED: dict[str, Any] = {
    "version": "9.8.7",
    "config": {
        "hash": HASH,
        "source": "/etc/proxy/proxy.yaml",
        "loaded_at": "2025-01-02T03:04:05+00:00",
    },
    "started_at": "2025-01-02T03:00:00+00:00",
    "draining": True,
    "routes": [
        route(
            "huggingface",
            breaker("closed", failure_rate=0.625, slow_rate=0.12, calls=40, consecutive_failures=2),
            bulkhead={"max_concurrent": 10, "max_queued": 20, "in_flight": 3, "queued": 2},
            last_minute={"requests": 1234, "retries": 7, "fallbacks": 4, "failures": 9},
            cache={"entries": 12, "bytes": 1572864},
        ),
        route("github", breaker("forced_open", forced=True)),
        route("cloudinary", breaker("open", seconds_until_half_open=42.0, failure_rate=1.0)),
        route("search", breaker("half_open", half_open_permits_in_use=1, half_open_successes=1)),
        route("uploads", breaker("disabled", forced=True)),
        route("plain", None),
        # Not a valid config name, but the page must not trust its input.
        route('evil"><b>x</b>', {"state": XSS}),
    ],
    "upstreams": [
        {"name": "api", "url": "https://api.example.com", "max_connections": 100, "in_flight": 5},
    ],
    "cache": {
        "entries": 12,
        "bytes": 1572864,
        "max_bytes": 67108864,
        "max_entry_bytes": 2097152,
        "evictions": 3,
    },
    "postgres": [
        {
            "name": "main",
            "dsn": "postgresql://postgres@db:5432/app",
            "status": "ok",
            "reason": "ok",
            "healthy": True,
            "pool_size": 7,
            "pool_used": 3,
            "pool_idle": 4,
            "check_duration_ms": 3.2,
            "consecutive_failures": 0,
            "last_error": None,
            "last_check": "2025-01-02T03:04:00+00:00",
            "utilization": 0.35,
            "server": {
                "total": 7,
                "active": 2,
                "idle": 4,
                "idle_in_transaction": 1,
                "waiting": 0,
                "max_connections": 100,
                "all_connections": 12,
                "partial": False,
            },
        },
        {
            "name": "replica",
            "dsn": "postgresql://postgres@replica:5432/app",
            "status": "critical",
            "reason": "consecutive_failures",
            "detail": "4 consecutive failed probes (critical at 3)",
            "healthy": False,
            "pool_size": 0,
            "pool_used": 0,
            "pool_idle": 0,
            "check_duration_ms": None,
            "consecutive_failures": 4,
            "last_error": "ConnectionRefusedError: " + XSS,
            "last_check": "2025-01-02T03:04:00+00:00",
            "utilization": None,
            "server": {},
        },
    ],
}


@pytest.fixture
async def canned(aiohttp_server: Any) -> AsyncIterator[Callable[..., Any]]:
    """Start an app serving the real status page at /admin/ and, at /admin/status, the
    canned document for the first `ok_for` requests, then 503 (to show the error state)."""

    async def start(doc: dict[str, Any], ok_for: int = 1_000_000) -> str:
        served = 0

        async def status(request: web.Request) -> web.Response:
            nonlocal served
            served += 1
            if served > ok_for:
                body = {"error": {"reason": "draining", "message": "admin listener closing"}}
                return web.json_response(body, status=503)
            return web.json_response(doc)

        app = web.Application()
        app.router.add_get("/admin/", status_page)
        app.router.add_get("/admin/status", status)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}/admin/"

    yield start


def cell(row: Node, label: str) -> str:
    return row.one("data-label", label).text


async def test_page_renders_every_part_of_the_status_document(
    browser: Browser, canned: Any
) -> None:
    dom = await browser.dom(await canned(CANNED))

    assert dom.by_tag("title")[0].text == "resilience-proxy"
    assert dom.by_id("version").text == "v9.8.7"
    assert dom.by_id("config-hash").text == HASH[:12]
    assert dom.by_id("config-hash").attrs["title"] == HASH
    assert dom.by_id("loaded-at").text.startswith("2025-01-0")  # local time, any zone
    assert not dom.by_id("draining").hidden
    assert dom.by_id("error").hidden
    assert dom.by_id("conn").attrs["data-conn"] == "ok"
    assert "last updated" in dom.by_id("updated").text

    rows = {r.attrs["data-route"]: r for r in dom.by_attr("data-route")}
    assert list(rows) == [r["name"] for r in CANNED["routes"]]  # config order, one row each

    states = {}
    for name, row in rows.items():
        badges = row.by_class("badge")
        states[name] = badges[0].attrs["data-state"] if badges else None
    assert states == {
        "huggingface": "closed", "github": "forced_open", "cloudinary": "open",
        "search": "half_open", "uploads": "disabled", "plain": None, 'evil"><b>x</b>': XSS,
    }  # fmt: skip
    # Colour is never the only signal: every badge says its state in words.
    assert rows["github"].by_class("badge")[0].text == "forced open"
    assert "state-forced_open" in rows["github"].by_class("badge")[0].classes
    assert "tone-bad" in rows["cloudinary"].by_class("badge")[0].classes
    assert "tone-warn" in rows["search"].by_class("badge")[0].classes
    assert "tone-ok" in rows["huggingface"].by_class("badge")[0].classes
    assert "tone-off" in rows["uploads"].by_class("badge")[0].classes
    assert "half-open in 42 s" in cell(rows["cloudinary"], "Breaker")
    assert "set by operator" in cell(rows["github"], "Breaker")
    assert cell(rows["plain"], "Breaker") == "none"

    hf = rows["huggingface"]
    assert cell(hf, "Failure rate") == "62.5% of 40 calls"
    assert cell(hf, "Slow calls") == "12%"
    assert cell(hf, "Requests (last min)") == "1,234"
    assert cell(hf, "Retries (last min)") == "7"
    assert cell(hf, "Fallbacks (last min)") == "4"
    assert cell(hf, "Failures (last min)") == "9"
    assert cell(hf, "Bulkhead") == "3 / 10 in flight queued 2 / 20"
    assert cell(hf, "Cache") == "12 entries 1.5 MiB"
    assert cell(rows["plain"], "Bulkhead") == "none"

    assert dom.one("data-upstream", "api").text.startswith("api https://api.example.com 5 / 100")
    assert dom.one("data-field", "entries").text == "12"
    assert dom.one("data-field", "bytes").text == "1.5 MiB of 64 MiB"
    assert dom.by_id("sum-breakers").text == "Breakers open 2 of 6"

    main = dom.one("data-pg", "main")
    assert main.by_class("badge")[0].attrs["data-status"] == "ok"
    assert "tone-ok" in main.by_class("badge")[0].classes
    fields = {f.attrs["data-field"]: f.text for f in main.by_attr("data-field")}
    assert fields["healthy"] == "yes"
    assert (fields["pool_size"], fields["pool_used"], fields["pool_idle"]) == ("7", "3", "4")
    assert fields["check_duration_ms"] == "3.2 ms"
    assert fields["consecutive_failures"] == "0"
    assert fields["utilization"] == "35%"
    assert "last_error" not in fields
    replica = dom.one("data-pg", "replica")
    assert replica.attrs["data-status"] == "critical"
    assert replica.one("data-field", "detail").text == "4 consecutive failed probes (critical at 3)"
    assert "tone-bad" in replica.by_class("badge")[0].classes
    assert replica.one("data-field", "healthy").text == "no"
    assert replica.one("data-field", "consecutive_failures").text == "4"
    assert replica.one("data-field", "check_duration_ms").text == "—"

    # Data is text, never markup: the hostile strings show up literally and create nothing.
    assert XSS in replica.one("data-field", "last_error").text
    body = dom.by_tag("body")[0]
    assert body.by_tag("img") == [] and body.by_tag("b") == []
    assert len(body.by_tag("script")) == 1
    assert dom.by_tag("title")[0].text != "pwned"


async def test_failed_refresh_shows_an_error_and_keeps_the_last_data(
    browser: Browser, canned: Any
) -> None:
    doc = copy.deepcopy(CANNED)
    doc["draining"] = False
    dom = await browser.dom(await canned(doc, ok_for=1))

    error = dom.by_id("error")
    assert not error.hidden
    assert "HTTP 503: admin listener closing" in error.text
    assert "Showing data from" in error.text
    assert dom.by_id("conn").attrs["data-conn"] == "error"
    assert "refresh failing" in dom.by_id("updated").text
    assert "stale" in dom.by_id("main").classes
    assert dom.by_id("draining").hidden
    # The data from the successful first fetch is still on the page.
    assert [r.attrs["data-route"] for r in dom.by_attr("data-route")][:2] == [
        "huggingface",
        "github",
    ]
    assert dom.one("data-pg", "replica").attrs["data-status"] == "critical"


async def test_unreachable_status_before_any_data(browser: Browser, canned: Any) -> None:
    dom = await browser.dom(await canned(CANNED, ok_for=0))
    assert not dom.by_id("error").hidden
    assert "No data yet" in dom.by_id("error").text
    assert dom.by_attr("data-route") == []


async def test_canned_page_screenshots(browser: Browser, canned: Any) -> None:
    url = await canned(CANNED)
    for size, name in (
        (DESKTOP, "statuspage-canned-desktop.png"),
        (PHONE, "statuspage-canned-phone.png"),
    ):
        assert_png(await browser.screenshot(url, name, size), size)


# -- the real proxy -------------------------------------------------------------------------

TOKEN = "statuspage-test-token"
PROXY_CONFIG = """
version: 1
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin_port}", token: {token}}}
shutdown: {{quiet_period: 0s, drain_timeout: 5s}}
state_file: {state}
upstreams:
  api:
    url: http://127.0.0.1:{dead_port}
routes:
  - name: github
    match: {{path_prefix: /github/}}
    upstream: api
    breaker: {{consecutive_failures: 3}}
  - name: huggingface
    match: {{path_prefix: /huggingface/}}
    upstream: api
    breaker: {{consecutive_failures: 3}}
    bulkhead: {{max_concurrent: 4, max_queued: 8, queue_timeout: 1s}}
postgres:
  - name: main
    dsn: postgresql://postgres@127.0.0.1:5432/postgres
    probe: {{interval: 60, timeout: 2}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    admin: str
    url: str  # the proxy listener


@pytest.fixture
async def real_proxy(served: Served) -> str:
    """The admin URL of `served`."""
    return served.admin


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """`python -m proxy run` on free ports; yields its URLs; SIGTERM on teardown."""
    port, admin_port = free_port(), free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text(
        textwrap.dedent(PROXY_CONFIG).format(
            port=port,
            admin_port=admin_port,
            token=TOKEN,
            dead_port=free_port(),
            state=tmp_path / "state.json",
        )
    )
    stderr = tmp_path / "proxy.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(config),
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                if proc.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(admin + "/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the proxy did not answer /healthz within 20 s")
        if proc.returncode is not None:
            raise AssertionError(
                f"the proxy exited {proc.returncode}: {stderr.read_text()[-3000:]}"
            )
        yield Served(admin, f"http://127.0.0.1:{port}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_real_proxy_page_shows_a_forced_open_breaker(
    browser: Browser, real_proxy: str
) -> None:
    async with aiohttp.ClientSession() as http:
        url = real_proxy + "/breakers/github/open"
        async with http.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(real_proxy + "/status") as resp:
            version = json.loads(await resp.text())["version"]

    dom = await browser.dom(real_proxy + "/")
    rows = {r.attrs["data-route"]: r for r in dom.by_attr("data-route")}
    assert set(rows) == {"github", "huggingface"}
    assert rows["github"].by_class("badge")[0].attrs["data-state"] == "forced_open"
    assert rows["huggingface"].by_class("badge")[0].attrs["data-state"] == "closed"
    assert "0 / 4 in flight" in cell(rows["huggingface"], "Bulkhead")
    assert dom.by_id("version").text == f"v{version}"
    assert dom.by_id("conn").attrs["data-conn"] == "ok"
    assert dom.by_id("error").hidden and dom.by_id("draining").hidden
    pg = dom.one("data-pg", "main")
    assert pg.attrs["data-status"] in {"unknown", "ok", "degraded", "critical"}

    for size, name in ((DESKTOP, "statuspage-desktop.png"), (PHONE, "statuspage-phone.png")):
        assert_png(await browser.screenshot(real_proxy + "/", name, size), size)


async def test_upstream_quota_is_shown_per_upstream(browser: Browser, canned: Any) -> None:
    doc = json.loads(json.dumps(CANNED))
    doc["upstreams"] = [
        {"name": "api", "url": "https://api.example.com", "max_connections": 100, "in_flight": 5, "quota": None},
        {
            "name": "gh", "url": "https://api.github.com", "max_connections": 50, "in_flight": 0,
            "quota": {"headers": "github", "reserve": 0, "remaining": 12, "limit": 5000,
                      "reset_seconds": 41.2, "paused_seconds": 0, "partitions": 1, "queued": 3},
        },
        {
            "name": "hf", "url": "https://huggingface.co", "max_connections": 50, "in_flight": 0,
            "quota": {"headers": "huggingface", "reserve": 0, "remaining": None, "limit": None,
                      "reset_seconds": None, "paused_seconds": 59.5, "partitions": 1, "queued": 0},
        },
    ]  # fmt: skip
    dom = await browser.dom(await canned(doc))
    assert cell(dom.one("data-upstream", "gh"), "Quota") == "12 / 5,000 left, resets in 42s, 3 waiting"
    assert cell(dom.one("data-upstream", "hf"), "Quota") == "paused 60s"
    assert cell(dom.one("data-upstream", "api"), "Quota") == "—"


async def test_a_failover_route_shows_each_targets_breaker_and_the_serving_one(
    browser: Browser, canned: Any
) -> None:
    doc = copy.deepcopy(CANNED)
    doc["routes"] = [
        route(
            "inference",
            breaker("open", seconds_until_half_open=12.0),
            upstream="hf",
            serving="hf_mirror",
            targets=[
                {"upstream": "hf", "primary": True, "serving": False,
                 "breaker": breaker("open"), "bulkhead": None},
                {"upstream": "hf_mirror", "primary": False, "serving": True,
                 "breaker": breaker("closed"), "bulkhead": None},
                {"upstream": "backup", "primary": False, "serving": False,
                 "breaker": None, "bulkhead": None},
            ],
        ),
        route("plain", None),
    ]
    dom = await browser.dom(await canned(doc))
    rows = {r.attrs["data-route"]: r for r in dom.by_attr("data-route")}
    line = rows["inference"].one("data-field", "failover").text
    assert line == (
        "failover: hf (open) → ▶ hf_mirror (closed) → backup (no breaker) · serving hf_mirror"
    )
    assert rows["plain"].by_attr("data-field", "failover") == []


# -- during an outage ------------------------------------------------------------------------


def history(n: int = 90, breaker: bool = True, **failures: list[int]) -> dict[str, Any]:
    """A canned 15-minute history: 10 requests per slot, p50 20 ms and p99 180 ms, the
    breaker (if any) closed until the last 12 slots."""
    return {
        "slot_seconds": 10.0,
        "end": 1735787045.0,
        "requests": [10] * n,
        "failures": failures,
        "p50_ms": [20.0] * (n - 1) + [None],
        "p99_ms": [180.0] * (n - 1) + [None],
        "breaker": ["closed"] * (n - 12) + ["open"] * 12 if breaker else None,
    }


OUTAGE = copy.deepcopy(CANNED)
OUTAGE["routes"] = [
    route(
        "huggingface",
        breaker(
            "open", seconds_until_half_open=12.0, trips=3, trip_reason="consecutive-failures",
            opened_at=1735787000.0,
        ),
        outcomes={"ok": 795, "timeout": 105, "breaker-open": 40},
        totals={"retries": 17, "fallbacks_stale": 4, "fallbacks_static": 0},
        latency_ms={"p50": 20.0, "p99": 180.0},
        last_failure={
            "outcome": "connect-failure",
            "cause": "CERTIFICATE_VERIFY_FAILED: " + XSS,
            "at": "2025-01-02T03:04:00+00:00",
        },
        history=history(timeout=[0] * 80 + [5] * 10, **{"breaker-open": [0] * 86 + [10] * 4}),
        quota={"remaining": 12, "limit": 5000, "reset_seconds": 90.0},
    ),
    route("plain", None, outcomes={"ok": 3}, history=history(breaker=False)),
]  # fmt: skip


def plot(row: Node, kind: str) -> Node:
    return row.one("data-plot", kind)


async def test_an_open_breaker_says_why_and_the_plots_show_the_outage(
    browser: Browser, canned: Any
) -> None:
    dom = await browser.dom(await canned(OUTAGE))
    rows = {r.attrs["data-route"]: r for r in dom.by_attr("data-route")}
    assert list(rows) == ["huggingface", "plain"]  # the detail rows are not route rows
    hf = rows["huggingface"]
    breaker_text = cell(hf, "Breaker")
    assert "tripped: consecutive failures" in breaker_text
    assert hf.one("data-field", "opened_at").text.startswith("opened 2025-01-0")
    assert "3 trips since start" in breaker_text
    assert XSS in hf.one("data-field", "last_cause").text  # as text, never markup
    assert "0 calls" not in cell(hf, "Failure rate")
    assert "not recording while open" in cell(hf, "Failure rate")

    detail = dom.one("data-route-detail", "huggingface")
    outcomes = {o.attrs["data-outcome"]: o.text for o in detail.one("data-field", "outcomes")
                .by_attr("data-outcome")}  # fmt: skip
    assert outcomes == {"ok": "ok 795", "timeout": "timeout 105", "breaker-open": "breaker-open 40"}
    assert detail.one("data-field", "latency").text == "Latency p50 20 ms · p99 180 ms (15 min)"
    assert "17 retries · 4 stale, 0 static fallbacks" in detail.one("data-field", "totals").text
    assert detail.one("data-field", "quota").text == "Quota 12 / 5,000 left, resets in 1 min 30 s"
    assert "CERTIFICATE_VERIFY_FAILED" in detail.one("data-field", "last_failure").text

    requests = plot(detail, "requests")
    assert len(requests.by_tag("rect")) == 90 and "900 · peak 10/10 s" in requests.text
    failures = plot(detail, "failures")
    drawn = [r.attrs["data-outcome"] for r in failures.by_tag("rect")]
    assert drawn.count("timeout") == 10 and drawn.count("breaker-open") == 4
    assert "timeout 50" in failures.text and "breaker-open 40" in failures.text
    lines = {p.attrs["data-series"]: p for p in plot(detail, "latency").by_tag("polyline")}
    assert set(lines) == {"p50", "p99"} and len(lines["p50"].attrs["points"].split()) == 89
    timeline = [(r.attrs["data-state"], r.attrs["data-slots"])
                for r in plot(detail, "breaker").by_tag("rect")]  # fmt: skip
    assert timeline == [("closed", "78"), ("open", "12")]
    # A route without a breaker has no timeline; nothing in the page became markup.
    assert dom.one("data-route-detail", "plain").by_attr("data-plot", "breaker") == []
    body = dom.by_tag("body")[0]
    assert body.by_tag("img") == [] and len(body.by_tag("script")) == 1

    url = await canned(OUTAGE)
    assert_png(await browser.screenshot(url, "statuspage-outage-desktop.png", DESKTOP), DESKTOP)
    assert_png(await browser.screenshot(url, "statuspage-outage-phone.png", PHONE), PHONE)


async def test_real_proxy_page_during_an_outage(browser: Browser, served: Served) -> None:
    """The upstream's port is closed: three refused connections trip the github breaker;
    the page shows the trip, the cause, the failures and the breaker timeline."""
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(served.url + "/github/repos") as resp:
                assert resp.status == 502
        for _ in range(2):
            async with http.get(served.url + "/github/repos") as resp:
                assert resp.status == 503
                assert resp.headers["X-Resilience-Reason"] == "breaker-open"
        async with http.get(served.admin + "/status") as resp:
            doc = json.loads(await resp.text())
    github = next(r for r in doc["routes"] if r["name"] == "github")
    assert github["breaker"]["state"] == "open"
    assert github["breaker"]["trip_reason"] == "consecutive-failures"
    assert github["last_failure"]["cause"] == "ECONNREFUSED"
    assert github["outcomes"] == {"connect-failure": 3, "breaker-open": 2}

    dom = await browser.dom(served.admin + "/")
    row = {r.attrs["data-route"]: r for r in dom.by_attr("data-route")}["github"]
    assert row.by_class("badge")[0].attrs["data-state"] == "open"
    assert "tripped: consecutive failures" in cell(row, "Breaker")
    assert "1 trip since start" in cell(row, "Breaker")
    assert row.one("data-field", "last_cause").text == "last error: ECONNREFUSED"
    detail = dom.one("data-route-detail", "github")
    drawn = {r.attrs["data-outcome"] for r in plot(detail, "failures").by_tag("rect")}
    assert drawn == {"connect-failure", "breaker-open"}
    runs = [(r.attrs["data-state"], int(r.attrs["data-slots"]))
            for r in plot(detail, "breaker").by_tag("rect")]  # fmt: skip
    assert runs[-1][0] == "open" and sum(n for _, n in runs) == 90
    assert "connect-failure 3" in detail.one("data-field", "outcomes").text
    assert_png(
        await browser.screenshot(served.admin + "/", "statuspage-outage-real.png", DESKTOP), DESKTOP
    )

"""Fixtures shared by the end-to-end tests: scripted upstreams, an HTTPS CA, the proxy."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.support.proxy import RunningProxy, start_proxy
from tests.support.upstream import ScriptedUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = await ScriptedUpstream().start()
    yield server
    await server.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[ScriptedUpstream]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    server = await ScriptedUpstream(ssl_context=ctx).start()
    yield server
    await server.close()


@pytest.fixture
async def proxy_factory(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    started: list[RunningProxy] = []

    async def factory(yaml_text: str, **values: object) -> RunningProxy:
        running = await start_proxy(yaml_text, tmp_path, **values)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.app.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session

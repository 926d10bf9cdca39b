"""Fixtures for tests/sdk: a fake provider on loopback and the proxy serving the shipped
config in front of it (tests/support/providers.py explains the set-up)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.server.app import ProxyApp
from tests.support.providers import (
    CLOUDINARY_KEY,
    CLOUDINARY_SECRET,
    GITHUB_TOKEN,
    HF_TOKEN,
    FakeProvider,
    Sidecar,
    shipped_config_for,
)
from tests.support.proxy import free_port


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = await FakeProvider().start()
    yield fake
    await fake.close()


@pytest.fixture
async def sidecar(provider: FakeProvider, tmp_path: Path) -> AsyncIterator[Sidecar]:
    port = free_port()
    env = {
        "RESILIENCE_PROXY_LISTEN": f"127.0.0.1:{port}",
        "RESILIENCE_PROXY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "RESILIENCE_PROXY_STATE": str(tmp_path / "state.json"),
        "DATABASE_URL": "postgresql://probe@127.0.0.1:9/none",  # nothing listens: a quiet probe
        "GITHUB_TOKEN": GITHUB_TOKEN,
        "HF_TOKEN": HF_TOKEN,
        "CLOUDINARY_API_KEY": CLOUDINARY_KEY,
        "CLOUDINARY_API_SECRET": CLOUDINARY_SECRET,
    }
    config = load_config(str(shipped_config_for(provider, tmp_path)), env=env)
    app = ProxyApp(config, str(tmp_path / "proxy.yaml"), watch_interval=3600.0)
    await app.start()
    yield Sidecar(app, port)
    await app.close()

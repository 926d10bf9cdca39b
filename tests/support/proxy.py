"""Running the proxy in-process on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

from proxy.config import load_config
from proxy.server.app import ProxyApp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class RunningProxy:
    app: ProxyApp
    port: int
    admin_port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def render(yaml_text: str, port: int, admin_port: int, **values: object) -> str:
    text = textwrap.dedent(yaml_text)
    for key, value in {"PORT": port, "ADMIN_PORT": admin_port, **values}.items():
        text = text.replace("{" + key + "}", str(value))
    return text


async def start_proxy(
    yaml_text: str, tmp_path: Path, *, watch_interval: float = 3600.0, **values: object
) -> RunningProxy:
    """Write the config (with {PORT}, {ADMIN_PORT} and any {NAME} filled in) and serve it."""
    port, admin_port = free_port(), free_port()
    path = tmp_path / "proxy.yaml"
    path.write_text(render(yaml_text, port, admin_port, **values))
    config = load_config(str(path), env={"XDG_STATE_HOME": str(tmp_path / "state")})
    app = ProxyApp(config, str(path), watch_interval=watch_interval)
    await app.start()
    return RunningProxy(app, port, admin_port, path)


async def poll(predicate, timeout: float = 5.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Wait until predicate() (sync or async) is truthy; return its value or fail."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)

"""Interim answers end to end (DESIGN §5): 103 relayed to HTTP/1.1 clients only; an
unasked-for 101 is a 502 upstream-status."""

from __future__ import annotations

import asyncio
import re

CONFIG = """
version: 1
listen: 127.0.0.1:{PORT}
admin: {listen: 127.0.0.1:{ADMIN_PORT}}
upstreams:
  api: {url: "{URL}"}
routes:
  - {name: api, match: {path_prefix: /api/}, upstream: api}
"""


async def _interim_upstream(interim: bytes):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(interim)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _ask(port: int, version: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/x HTTP/" + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return raw


async def test_early_hints_are_relayed_to_http11_clients_only(proxy_factory):
    server = await _interim_upstream(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    port = server.sockets[0].getsockname()[1]
    try:
        p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{port}")
        raw = await _ask(p.port, b"1.1")
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"103", b"200"], raw
        assert b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" in raw
        assert raw.endswith(b"done")
        raw = await _ask(p.port, b"1.0")
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200"], raw
    finally:
        server.close()


async def test_an_unasked_for_101_is_a_502(proxy_factory):
    server = await _interim_upstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
    port = server.sockets[0].getsockname()[1]
    try:
        p = await proxy_factory(CONFIG, URL=f"http://127.0.0.1:{port}")
        raw = await _ask(p.port, b"1.1")
        assert raw.startswith(b"HTTP/1.1 502 "), raw
        assert b"X-Resilience-Reason: upstream-status\r\n" in raw
    finally:
        server.close()

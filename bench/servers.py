"""Reference servers for the benchmark, each one process started by bench/run.py.

- `trivial`: an aiohttp handler that returns the upstream's body from memory: the floor cost
  of accepting, parsing and answering one request in aiohttp (the rejection rows compare
  against it).
- `naive-proxy`: the reverse proxy people write in ten lines of aiohttp (read the request,
  `ClientSession.request`, read the whole body, answer): the "≈9× nginx CPU/request"
  figure the issues quote, measured here on the same machine.

Both run on uvloop, like resilience-proxy (`--loop asyncio` for the default loop).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers aiohttp recomputes.
_DROP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "host",
    )
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def trivial_app(body: bytes) -> web.Application:
    """Answer every GET with `body` (application/json, Cache-Control like the upstream)."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"Cache-Control": "max-age=60"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def naive_proxy_app(upstream: str) -> web.Application:
    """Forward every request to `upstream` + path?query with one shared keep-alive session."""
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def handle(request: web.Request) -> web.Response:
        session = request.app[session_key]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        data = await request.read()
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=data or None
        ) as response:
            payload = await response.read()
            out = {k: v for k, v in response.headers.items() if k.lower() not in _DROP}
            return web.Response(status=response.status, body=payload, headers=out)

    async def open_session(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=256)
        app[session_key] = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        await app[session_key].close()

    app = web.Application()
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(app: web.Application, port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT, then clean up and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, reuse_address=True)
    await site.start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("trivial", "naive-proxy"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", help="trivial: the body to return")
    parser.add_argument("--upstream", help="naive-proxy: http://host:port of the upstream")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    if args.kind == "trivial":
        if not args.body_file:
            parser.error("trivial needs --body-file")
        with open(args.body_file, "rb") as f:
            app = trivial_app(f.read())
    else:
        if not args.upstream:
            parser.error("naive-proxy needs --upstream")
        app = naive_proxy_app(args.upstream.rstrip("/"))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(app, args.port))
    else:
        asyncio.run(serve(app, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line (DESIGN §3): run, check, schema, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from proxy import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilience-proxy",
        description="A sidecar reverse proxy with per-route timeouts, retries, circuit "
        "breakers, bulkheads and cached fallbacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve"), ("check", "validate the config and print every problem")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument(
            "--config",
            help="config file (default: $RESILIENCE_PROXY_CONFIG, else config/proxy.yaml)",
        )
    run = sub.choices["run"]
    run.add_argument(
        "--log-level",
        default=os.environ.get("RESILIENCE_PROXY_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    sub.add_parser("schema", help="print the config's JSON Schema")
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        _write([__version__])
        return 0
    from proxy.config import ConfigInvalid, default_config_path, json_schema, load_config

    if args.command == "schema":
        _write([json.dumps(json_schema(), indent=2)])
        return 0
    path = args.config or default_config_path(os.environ)
    out = sys.stderr if args.command == "run" else sys.stdout
    try:
        config = load_config(path)
    except ConfigInvalid as exc:
        _write([str(problem) for problem in exc.problems], out)
        return 2
    except Exception as exc:  # noqa: BLE001 -- a loader bug is a problem line, not a traceback
        _write([f"{path}: cannot load: internal error ({type(exc).__name__}), please report"], out)
        return 2
    if args.command == "check":
        lines = [str(warning) for warning in config.warnings]
        lines.append(f"{path}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams)")
        _write(lines)
        return 0
    return _run(config, path, args.log_level)


def _write(lines: list[str], out: TextIO | None = None) -> None:
    """Print `lines`; a reader that stops early (`resilience-proxy schema | head`) is not an
    error: the rest is dropped, the exit status stays the command's own."""
    out = sys.stdout if out is None else out
    try:
        for line in lines:
            print(line, file=out)
        out.flush()
    except BrokenPipeError:
        # Point the stream at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)


def _run(config: object, path: str, level: str) -> int:
    from proxy.config.model import Config
    from proxy.observe import log

    assert isinstance(config, Config)
    log.setup(level)
    for warning in config.warnings:
        log.warning("config_warning", problem=str(warning))
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        pass
    try:
        return int(runner(_serve(config, path)))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled by the loop
        return 0


async def _serve(config: object, path: str) -> int:
    from proxy.config.model import Config
    from proxy.observe import log
    from proxy.server.app import ProxyApp

    assert isinstance(config, Config)
    app = ProxyApp(config, path)
    try:
        await app.start()
    except OSError as exc:
        log.error("listen_failed", error=exc.strerror or str(exc))
        await app.close()
        return 1
    app.install_signal_handlers()
    await app.wait_stopped()
    await app.drain_and_stop()
    return 0

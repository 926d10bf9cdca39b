"""Command line (DESIGN §3): run, check, schema, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TextIO

from proxy.version import version_text

if TYPE_CHECKING:
    from proxy.config.model import Config


class _PrintVersion(argparse.Action):
    """`--version`: the same line as `version`; git is asked only when the flag is given."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilience-proxy",
        description="A sidecar reverse proxy with per-route timeouts, retries, circuit "
        "breakers, bulkheads and cached fallbacks.",
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
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
        _write([version_text()])
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


def exposed_credentials(config: Config) -> list[str]:
    """The upstreams whose injected credentials a non-loopback proxy listener offers to
    whoever reaches it (`allow_remote_clients: true`); empty on loopback."""
    from proxy.config.schema import is_loopback

    if is_loopback(config.listen_host.strip("[]")):
        return []
    return sorted(name for name, up in config.upstreams.items() if up.injects_credentials)


async def _serve(config: object, path: str) -> int:
    from proxy.config.model import Config
    from proxy.observe import log
    from proxy.server.app import ProxyApp

    assert isinstance(config, Config)
    exposed = exposed_credentials(config)
    if exposed:
        log.warning(
            "remote_clients_allowed",
            listen=_address(config.listen_host, config.listen_port),
            upstreams=exposed,
            message="the proxy listener is not on loopback and these upstreams inject "
            "credentials: anyone who can reach it can use them; keep the port on a trusted "
            "network, or listen on 127.0.0.1",
        )
    app = ProxyApp(config, path)
    try:
        await app.start()
    except OSError as exc:
        log.error("listen_failed", error=exc.strerror or str(exc))
        await app.close()
        return 1
    app.install_signal_handlers()
    trim_heap()
    await app.wait_stopped()
    await app.drain_and_stop()
    return 0


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where
    there is no such call (musl, macOS). Loading and compiling the config frees about 2 MB
    that glibc would otherwise keep in the RSS for the life of the process."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

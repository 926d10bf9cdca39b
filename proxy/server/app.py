"""The process: listeners, live config, reloads, breaker persistence and shutdown (DESIGN §10).

Lifecycle: `start()` binds both listeners, restores breaker state and starts the Postgres
prober and the config watcher; `reload()` builds a new `Runtime` aside and swaps one
reference; `drain_and_stop()` is the sidecar-friendly shutdown: readiness fails at once, the
proxy keeps serving until it has been idle for `quiet_period` (or `drain_timeout` passed),
then stops listening, lets in-flight requests finish, saves state and closes pools.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.cache import FallbackStore
from proxy.clock import SYSTEM_CLOCK, Clock, Rng, system_rng
from proxy.config import ConfigInvalid, load_config, watch_digest
from proxy.config.model import Config
from proxy.observe import log
from proxy.observe.events import BreakerTransitioned, ConfigReloaded, EventBus
from proxy.observe.metrics import Metrics, observe_unrouted
from proxy.pgprobe import ProberSet
from proxy.resilience.statefile import (
    breakers_state,
    load_state,
    restore_breakers,
    save_state,
)
from proxy.server.admin import build_admin_app
from proxy.server.handler import Activity, ProxyHandler
from proxy.server.protocol import ProxyListener
from proxy.server.runtime import Registry, Runtime, compile_runtime
from proxy.state import StateBackend, make_backend
from proxy.state.sharing import BreakerSharing

WATCH_INTERVAL = 2.0  # seconds between config file content checks
STATE_DEBOUNCE = 0.05  # seconds: transitions within this window are written once


class ProxyApp:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: Rng | None = None,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        self.config_path = config_path
        self.clock = clock
        self.rng = rng or system_rng()
        self.bus = EventBus()
        self.metrics = Metrics(clock=clock)
        self.bus.subscribe(self.metrics.on_event)
        self.bus.subscribe(log.on_event)
        self.bus.subscribe(self._on_event)
        self.store = FallbackStore(config.cache, clock)
        self.registry = Registry(clock, self.bus, self.store)
        self.state: StateBackend = make_backend(config.state, clock, self.bus.emit)
        self.registry.state = self.state
        self.sharing = BreakerSharing(self.registry.breakers, lambda: self.state, clock)
        self.sharing.attach(self.state)
        self.bus.subscribe(self.sharing.on_event)
        self.probers = ProberSet(clock, self.bus.emit)
        self.runtime: Runtime = compile_runtime(
            config, self.registry, self.metrics, clock, self.rng, self.bus
        )
        self.watch_interval = watch_interval
        self.draining = False
        self.activity = Activity(clock)
        self.started_at = clock.wall()
        self._last_failed_hash: str | None = None
        self._reload_lock = asyncio.Lock()
        self._server: ProxyListener | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state_pending: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._wire_live_metrics()
        log.set_secrets(config.secrets)

    # -- request accounting (for the quiet period) -------------------------------------
    @property
    def active(self) -> int:
        return self.activity.active

    @property
    def last_activity(self) -> float:
        return self.activity.last

    def count_unparsed(self, status: int) -> None:
        """A request the listener could not parse (400, 408, 431): counted with route "",
        method OTHER (its method is unknown) and outcome rejected (DESIGN §9)."""
        observe_unrouted(self.metrics, "OTHER", status, "rejected", 0.0)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _wire_live_metrics(self) -> None:
        live = self.metrics.live
        live.breakers = self.registry.iter_breakers
        live.bulkheads = self.registry.iter_bulkheads
        live.cache = lambda: (self.store.entries, self.store.bytes)
        live.config_hash = lambda: self.runtime.config.hash[:12]
        live.postgres = self.probers.snapshots
        live.quotas = self.registry.iter_quotas
        live.credentials = lambda: (
            (name, not upstream.missing_headers)
            for name, upstream in self.runtime.config.upstreams.items()
        )

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self._restore_breakers()
        await self.state.start()  # bounded by state.timeout; never raises
        loop = asyncio.get_running_loop()
        handler = ProxyHandler(
            lambda: self.runtime,
            clock=self.clock,
            rng=self.rng,
            metrics=self.metrics,
            activity=self.activity,
            on_unparsed=self.count_unparsed,
        )
        self._server = ProxyListener(handler)
        self._listener = await loop.create_server(
            self._server, config.listen_host, config.listen_port, reuse_address=True, backlog=1024
        )
        self._admin_runner = web.AppRunner(
            build_admin_app(self), access_log=None, handle_signals=False
        )
        await self._admin_runner.setup()
        site = web.TCPSite(
            self._admin_runner, config.admin.host, config.admin.port, reuse_address=True
        )
        await site.start()
        await self.probers.apply(config.postgres)
        if self.config_path is not None:
            self._spawn(self._watch_config())
        self.bus.emit(ConfigReloaded("ok", "start", config.hash))
        warn_missing_credentials(config)
        log.info(
            "started",
            version=__version__,
            listen=f"{config.listen_host}:{config.listen_port}",
            admin=f"{config.admin.host}:{config.admin.port}",
            routes=len(config.routes),
            config_hash=config.hash[:12],
        )

    @property
    def proxy_port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reload ----------------------------------------------------------------------------
    async def reload(self, trigger: str) -> tuple[str, list[str]]:
        """Load, validate and swap in the config file; returns (result, problem lines).

        The file is read, parsed and compiled in a worker thread (the loader's caps bound
        that work), so the event loop keeps serving meanwhile; only the swap runs on the
        loop. Never raises: any failure is a rejected, counted and logged reload, and the
        running config keeps serving.
        """
        if self.config_path is None:
            return "unchanged", []
        async with self._reload_lock:
            try:
                config = await _load_aside(self.config_path)
            except ConfigInvalid as exc:
                return self._reload_failed(trigger, [str(p) for p in exc.problems])
            except Exception as exc:  # noqa: BLE001 -- a loader bug must not kill the proxy
                problem = f"{self.config_path}: cannot load: {type(exc).__name__}"
                return self._reload_failed(trigger, [problem])
            self._last_failed_hash = None
            current = self.runtime.config
            if config.hash == current.hash:
                self.bus.emit(ConfigReloaded("unchanged", trigger, config.hash))
                return "unchanged", []
            notes = []
            if (config.listen_host, config.listen_port) != (
                current.listen_host,
                current.listen_port,
            ):
                notes.append("listen changed: takes effect after a restart")
            if config.admin.host != current.admin.host or config.admin.port != current.admin.port:
                notes.append("admin.listen changed: takes effect after a restart")
            self.store.update_settings(config.cache)
            if config.state != current.state:
                await self._swap_state(config)
            kept = {route.name for route in config.routes}
            for route in current.routes:
                if route.name not in kept:
                    self.store.clear(route.name)  # a removed route's state is dropped
            try:
                self.runtime = compile_runtime(
                    config, self.registry, self.metrics, self.clock, self.rng, self.bus
                )
            except Exception as exc:  # noqa: BLE001 -- the running config keeps serving
                problem = f"{self.config_path}: cannot apply: {type(exc).__name__}"
                return self._reload_failed(trigger, [problem])
            log.set_secrets(config.secrets | current.secrets)
            await self.probers.apply(config.postgres)
            self.bus.emit(ConfigReloaded("ok", trigger, config.hash))
            for warning in config.warnings:
                log.warning("config_warning", problem=str(warning))
            warn_missing_credentials(config)
            for note in notes:
                log.warning("config_reload_partial", note=note)
            return "ok", notes

    def _reload_failed(self, trigger: str, problems: list[str]) -> tuple[str, list[str]]:
        self._last_failed_hash = self._watch_digest()
        self.bus.emit(ConfigReloaded("error", trigger, problems=tuple(problems)))
        return "error", problems

    def _watch_digest(self) -> str | None:
        """The digest the config would have if loaded now (its file and the files it reads)."""
        assert self.config_path is not None
        return watch_digest(self.config_path, self.runtime.config.watched_files)

    async def _swap_state(self, config: Config) -> None:
        """Start the new state backend, then swap it in (before the runtime is compiled)."""
        backend = make_backend(config.state, self.clock, self.bus.emit)
        self.sharing.attach(backend)
        await backend.start()
        old, self.state = self.state, backend
        self.registry.state = backend
        await old.close()
        if backend.name == "local":
            self.metrics.state_backend_gone()

    async def _watch_config(self) -> None:
        """Poll the content of the file and of the files it reads (`${file:PATH}`, the token
        file): catches edits, ConfigMap and Secret symlink swaps alike. Survives anything."""
        assert self.config_path is not None
        while True:
            await self.clock.sleep(self.watch_interval)
            try:
                digest = await asyncio.to_thread(self._watch_digest)
                if digest is None or digest == self.runtime.config.hash:
                    continue
                if digest == self._last_failed_hash:
                    continue  # already rejected and logged; wait for the next edit
                await self.reload("file-change")
            except Exception as exc:  # noqa: BLE001 -- the watcher must keep polling
                log.error("config_watch_failed", error=type(exc).__name__)

    # -- breaker persistence ------------------------------------------------------------
    def _on_event(self, event: object) -> None:
        if isinstance(event, BreakerTransitioned) and self.config.state_file:
            if self._state_pending is None:
                loop = asyncio.get_running_loop()
                self._state_pending = loop.call_later(STATE_DEBOUNCE, self._save_breakers)

    def _save_breakers(self) -> None:
        self._state_pending = None
        path = self.config.state_file
        if not path:
            return
        data = breakers_state(self.registry.breakers.values(), self.clock.wall())
        try:
            save_state(path, data)
        except OSError as exc:
            log.warning("state_save_failed", path=path, error=exc.strerror or type(exc).__name__)

    def _restore_breakers(self) -> None:
        path = self.config.state_file
        if not path:
            return
        data, warning = load_state(path)
        if warning:
            log.warning("state_ignored", path=path, reason=warning)
        if not data:
            return
        for problem in restore_breakers(data, self.registry.breakers, self.clock.wall()):
            log.warning("state_ignored", path=path, reason=problem)

    # -- shutdown --------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("signal")))

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("shutdown_forced", signal=name)
            self._save_breakers()
            os._exit(1)
        log.info("shutdown_requested", signal=name)
        self.draining = True
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def drain_and_stop(self) -> None:
        policy = self.config.shutdown
        clock = self.clock
        self.draining = True
        began = clock.now()
        deadline = began + policy.drain_timeout
        # Keep serving while the agent beside us may still be finishing its work.
        while clock.now() < deadline:
            idle_for = clock.now() - self.last_activity
            if self.active == 0 and idle_for >= policy.quiet_period:
                break
            await clock.sleep(min(0.1, max(0.0, deadline - clock.now())))
        log.info("shutdown_draining", active=self.active, waited=round(clock.now() - began, 3))
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            left = max(0.0, deadline - clock.now())
            await self._server.shutdown(left, self.clock.sleep)
        if self._listener is not None:
            await self._listener.wait_closed()
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        if self._state_pending is not None:
            self._state_pending.cancel()
            self._state_pending = None
        self._save_breakers()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.probers.close()
        await self.sharing.close()
        await self.state.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._server is not None:
            self._server.abort_all()  # what is still connected now is cut
        await self.registry.close()


def warn_missing_credentials(config: Config) -> None:
    """One warning per injected header left out because its ${VAR} is empty: a missing
    Secret would otherwise send calls unauthenticated with no signal. Names only, never a
    value."""
    for name, upstream in config.upstreams.items():
        for header in upstream.missing_headers:
            log.warning(
                "upstream_credentials_missing",
                upstream=name,
                header=header,
                message="a ${VAR} in this injected header is empty: the header is not sent",
            )


RELOAD_SWITCH_INTERVAL = 0.0005  # seconds: how often a parsing thread hands the GIL back


async def _load_aside(path: str) -> Config:
    """`load_config` in a worker thread, without pausing the event loop.

    Parsing YAML is pure Python and holds the GIL. While it runs, the interpreter hands the
    GIL back to the loop every 0.5 ms instead of the default 5 ms, and the cyclic garbage
    collector is off: a full collection triggered by the parse's many short-lived objects
    would hold the GIL for tens of milliseconds at once (measured: 50-95 ms). The loader's
    caps bound what accumulates meanwhile; the collector resumes as soon as the load ends.
    """
    previous = sys.getswitchinterval()
    collecting = gc.isenabled()
    sys.setswitchinterval(min(previous, RELOAD_SWITCH_INTERVAL))
    gc.disable()
    try:
        result = await asyncio.to_thread(_load_detached, path)
    finally:
        sys.setswitchinterval(previous)
        if collecting:
            gc.enable()
    if isinstance(result, ConfigInvalid):
        raise result
    return result


def _load_detached(path: str) -> Config | ConfigInvalid:
    """`load_config`, its refusal returned as a fresh `ConfigInvalid`: the original's
    traceback holds the parser's frames, and with them the whole parse, alive."""
    try:
        return load_config(path)
    except ConfigInvalid as exc:
        return ConfigInvalid(exc.problems)

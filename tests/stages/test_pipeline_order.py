"""The stage order is declared once (stages/pipeline.py) and only enabled stages are built."""

from __future__ import annotations

from proxy.cache import FallbackStore
from proxy.clock import FakeClock, system_rng
from proxy.config import load_config_text
from proxy.observe.events import EventBus
from proxy.server.runtime import Registry
from proxy.stages.pipeline import ORDER, build_pipeline

CONFIG = """
version: 1
upstreams:
  u: {url: "http://127.0.0.1:9"}
  metered: {url: "http://127.0.0.1:9", quota: {headers: github}}
routes:
  - name: everything
    match: {path_prefix: /all/}
    upstream: metered
    rate_limit: {rps: 10}
    retry: true
    breaker: true
    bulkhead: true
    fallback: true
  - {name: bare, match: {path_prefix: /bare/}, upstream: u}
  - {name: some, match: {path_prefix: /some/}, upstream: u, breaker: true, fallback: true}
"""


def _stages(route_name: str) -> tuple[str, ...]:
    config = load_config_text(CONFIG, env={})
    clock = FakeClock()
    bus = EventBus()
    store = FallbackStore(config.cache, clock)
    registry = Registry(clock, bus, store)
    route = next(r for r in config.routes if r.name == route_name)
    _, names = build_pipeline(route, registry.state_for(route), clock, system_rng(), bus)
    return names


def test_declared_order_is_designs():
    # DESIGN §6: rate limit → fallback → total timeout → retry → (failover →) quota → breaker
    # → bulkhead → attempt timeout.
    assert [name for name, _ in ORDER] == [
        "rate_limit",
        "fallback",
        "total_timeout",
        "retry",
        "quota",
        "breaker",
        "bulkhead",
    ]


def test_a_route_with_every_stage_runs_them_outermost_first():
    assert _stages("everything") == (
        "rate_limit",
        "fallback",
        "total_timeout",
        "retry",
        "quota",
        "breaker",
        "bulkhead",
        "attempt",
    )


def test_only_enabled_stages_are_built():
    assert _stages("bare") == ("total_timeout", "attempt")
    assert _stages("some") == ("fallback", "total_timeout", "breaker", "attempt")

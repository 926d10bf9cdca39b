"""The stage order is declared once (stages/pipeline.py) and only enabled stages are built.

Route stages run once per request, then (failover routes only) the failover stage, then one
chain per target; a route without failover gets no failover stage and one chain."""

from __future__ import annotations

from proxy.cache import FallbackStore
from proxy.clock import FakeClock, system_rng
from proxy.config import load_config_text
from proxy.observe.events import EventBus
from proxy.server.runtime import Registry
from proxy.stages.attempt import AttemptStage
from proxy.stages.breaker import BreakerStage
from proxy.stages.failover import FailoverStage
from proxy.stages.pipeline import FAILOVER, ORDER, ROUTE_ORDER, TARGET_ORDER, build_pipeline

CONFIG = """
version: 1
upstreams:
  u: {url: "http://127.0.0.1:9"}
  v: {url: "http://127.0.0.1:10"}
  w: {url: "http://127.0.0.1:11"}
  metered: {url: "http://127.0.0.1:12", quota: {headers: github}}
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
  - name: failover
    match: {path_prefix: /fo/}
    upstream: u
    retry: true
    breaker: true
    bulkhead: true
    fallback: true
    failover: {upstreams: [v, w]}
  - {name: plain-failover, match: {path_prefix: /pf/}, upstream: u, failover: {upstreams: [v]}}
"""


def _build(route_name: str):  # type: ignore[no-untyped-def]
    config = load_config_text(CONFIG, env={})
    clock = FakeClock()
    bus = EventBus()
    store = FallbackStore(config.cache, clock)
    registry = Registry(clock, bus, store)
    route = next(r for r in config.routes if r.name == route_name)
    return build_pipeline(route, registry.state_for(route), clock, system_rng(), bus)


def _stages(route_name: str) -> tuple[str, ...]:
    return _build(route_name)[1]


def test_declared_order_is_designs():
    # DESIGN §6: rate limit → fallback → total timeout → retry → failover → quota → breaker
    # → bulkhead → attempt timeout.
    assert ORDER == (
        "rate_limit",
        "fallback",
        "total_timeout",
        "retry",
        "failover",
        "quota",
        "breaker",
        "bulkhead",
        "attempt",
    )
    assert [name for name, _ in ROUTE_ORDER] == ["rate_limit", "fallback", "total_timeout", "retry"]
    assert FAILOVER == "failover"
    assert [name for name, _ in TARGET_ORDER] == ["quota", "breaker", "bulkhead"]


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


def test_a_failover_route_runs_the_failover_stage_between_retry_and_the_target_chains():
    assert _stages("failover") == (
        "fallback",
        "total_timeout",
        "retry",
        "failover",
        "breaker",
        "bulkhead",
        "attempt",
    )
    assert _stages("plain-failover") == ("total_timeout", "failover", "attempt")


def test_each_target_has_its_own_chain_breaker_and_client():
    stage, _ = _build("failover")
    while not isinstance(stage, FailoverStage):
        stage = stage.next
    assert stage.names == ("u", "v", "w")
    breakers = [chain.breaker for chain in stage.chains if isinstance(chain, BreakerStage)]
    assert len(breakers) == 3 and len({id(b) for b in breakers}) == 3
    assert [b.upstream for b in breakers] == ["u", "v", "w"]
    attempts = []
    for chain in stage.chains:
        while not isinstance(chain, AttemptStage):
            chain = chain.next
        attempts.append(chain)
    assert [a.client.upstream.name for a in attempts] == ["u", "v", "w"]
    assert [a.index for a in attempts] == [0, 1, 2]


def test_a_route_without_failover_gets_one_chain_and_no_failover_stage():
    stage, _ = _build("everything")
    while stage.next is not None:
        assert not isinstance(stage, FailoverStage)
        stage = stage.next
    assert isinstance(stage, AttemptStage) and stage.plan is None

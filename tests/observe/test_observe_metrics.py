"""The plain counters and their scrape-time rendering (issue 11), without a server."""

from __future__ import annotations

from prometheus_client import generate_latest

from proxy.clock import FakeClock
from proxy.observe.metrics import FAMILIES, PREFIX, Metrics, RequestRecord, observe_unrouted
from tests.support.metrics import value


def record(outcome: str = "ok", code: int = 200, **fields: object) -> RequestRecord:
    rec = RequestRecord("GET")
    rec.code, rec.outcome = code, outcome
    for name, v in fields.items():
        setattr(rec, name, v)
    return rec


def text(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_rejections_count_even_when_a_fallback_answered() -> None:
    m = Metrics(clock=FakeClock())
    route = m.route("r", "u")
    route.observe(record("fallback-stale", bulkhead_rejected=1), 0.001, False, 1000.0)
    route.observe(record("fallback-static", breaker_rejected=1), 0.001, False, 1000.0)
    route.observe(record("breaker-open", 503, breaker_rejected=1), 0.001, False, 1000.0)
    out = text(m)
    assert value(out, PREFIX + "bulkhead_rejected_total", route="r", upstream="u") == 1
    assert value(out, PREFIX + "breaker_rejected_total", route="r", upstream="u") == 2
    assert value(out, PREFIX + "fallbacks_total", route="r", kind="stale") == 1
    assert value(out, PREFIX + "fallbacks_total", route="r", kind="static") == 1


def test_counts_survive_a_reload_and_unknown_methods_are_other() -> None:
    m = Metrics(clock=FakeClock())
    m.route("r", "u").observe(record(), 0.002, False, 1000.0)
    rec = record()
    rec.method = "BREW"
    m.route("r", "u").observe(rec, 0.002, False, 1000.0)  # a recompiled snapshot
    observe_unrouted(m, "PROPFIND", 404, "no-route", 0.0)
    out = text(m)
    ok = {"route": "r", "code": "200", "outcome": "ok"}
    assert value(out, PREFIX + "requests_total", method="GET", **ok) == 1
    assert value(out, PREFIX + "requests_total", method="OTHER", **ok) == 1
    assert value(out, PREFIX + "request_duration_seconds_count", route="r") == 2
    assert value(out, PREFIX + "requests_total", route="", method="OTHER", outcome="no-route") == 1


def test_every_declared_family_is_rendered_with_its_help() -> None:
    out = text(Metrics(clock=FakeClock()))
    for name, family in FAMILIES.items():
        exposed = PREFIX + name  # the text format keeps `_total` on counters
        assert f"# HELP {exposed} " in out, name
        assert f"# TYPE {exposed} {family.kind}" in out, name
    assert "_created" not in out

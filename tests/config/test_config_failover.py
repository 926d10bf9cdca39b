"""`routes[].failover` (DESIGN §16): targets after the primary, conditions, and problems."""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import Config, json_schema

Problems = Callable[..., list[str]]
Load = Callable[..., Config]

BASE = """\
upstreams:
  a: {url: "https://a.example.com/v1", headers: {Authorization: "Bearer A"}}
  b: {url: "https://b.example.com"}
  c: {url: "http://127.0.0.1:9000/base"}
routes:
"""


def test_targets_are_the_primary_then_the_listed_ones_in_order(load_yaml: Load) -> None:
    config = load_yaml(BASE + "  - {name: r, upstream: a, failover: {upstreams: [c, b]}}\n")
    route = config.routes[0]
    assert [u.name for u in route.targets] == ["a", "c", "b"]
    assert route.failover is not None
    # the default conditions: every transport failure, both refusals, and 5xx answers
    assert route.failover.conditions == {
        "connect-failure", "reset", "timeout", "breaker-open", "quota"
    }
    assert 503 in route.failover.statuses and 429 not in route.failover.statuses


def test_a_route_without_failover_has_one_target(load_yaml: Load) -> None:
    route = load_yaml(BASE + "  - {name: r, upstream: a}\n").routes[0]
    assert route.failover is None and route.targets == (route.upstream,)


def test_on_takes_retry_conditions_refusals_and_statuses(load_yaml: Load) -> None:
    config = load_yaml(
        BASE + "  - {name: r, upstream: a, failover: {upstreams: [b], "
        "on: [connect-failure, breaker-open, quota, 502-504, 429]}}\n"
    )
    failover = config.routes[0].failover
    assert failover is not None
    assert failover.conditions == {"connect-failure", "breaker-open", "quota"}
    assert set(failover.statuses.statuses) == {502, 503, 504, 429}
    assert config.redacted["routes"][0]["failover"] == {  # type: ignore[index]
        "upstreams": ["b"],
        "on": ["connect-failure", "breaker-open", "quota", "502-504", "429"],
    }


def test_unknown_duplicate_and_primary_targets_are_problems_at_their_lines(
    problems_of: Problems,
) -> None:
    text = BASE + (
        "  - name: r\n"
        "    upstream: a\n"
        "    failover:\n"
        "      upstreams:\n"
        "        - b\n"
        "        - a\n"
        "        - b\n"
        "        - mirror\n"
    )
    assert problems_of(text) == [
        "config/proxy.yaml:11: routes[0].failover.upstreams[1]: 'a' is the route's upstream "
        "(the primary, tried first); list only the alternatives",
        "config/proxy.yaml:12: routes[0].failover.upstreams[2]: 'b' is listed twice "
        "(first at failover.upstreams[0]): each target is tried once",
        "config/proxy.yaml:13: routes[0].failover.upstreams[3]: unknown upstream 'mirror' "
        "(defined: a, b, c)",
    ]


def test_conditions_outside_the_vocabulary_and_empty_lists_are_problems(
    problems_of: Problems,
) -> None:
    text = BASE + (
        "  - name: r\n"
        "    upstream: a\n"
        "    failover: {upstreams: [b], on: [bulkhead-full, 5xx]}\n"
        "  - name: s\n"
        "    upstream: a\n"
        "    failover: {upstreams: []}\n"
        "  - name: t\n"
        "    upstream: a\n"
        "    failover: {on: [reset], targets: [b]}\n"
    )
    found = problems_of(text)
    assert found[0].startswith(
        "config/proxy.yaml:8: routes[0].failover.on[0]: unknown condition 'bulkhead-full'; "
        "valid: connect-failure, reset, timeout, breaker-open, quota, 5xx"
    )
    assert found[1] == (
        "config/proxy.yaml:11: routes[1].failover.upstreams: must list at least 1 item(s), got 0"
    )
    assert "config/proxy.yaml:14: routes[2].failover.targets: unknown key" in found[2]
    assert found[3] == "config/proxy.yaml:14: routes[2].failover.upstreams: required"


def test_the_json_schema_describes_failover() -> None:
    schema = json_schema()
    route = schema["$defs"]["RouteSpec"]["properties"]["failover"]
    assert "FailoverSpec" in str(route)
    failover = schema["$defs"]["FailoverSpec"]
    assert failover["required"] == ["upstreams"]
    assert failover["properties"]["upstreams"]["minItems"] == 1
    assert failover["additionalProperties"] is False

"""Compilation: defaults, policy merging, tokens, upstream URLs, routes, state file, postgres."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.config.model import (
    BreakerPolicy,
    BulkheadPolicy,
    FailureRatePolicy,
    FallbackPolicy,
    RetryPolicy,
    StaticFallback,
    TimeoutPolicy,
)

Load = Callable[..., Config]

POLICY = """\
upstreams:
  api: {url: https://api.example.com}
policies:
  api:
    timeout: {total: 30s, per_try: 10s, idle: 45s}
    retry:
      max_attempts: 4
      backoff: {initial: 1s, max: 20s}
      on: [connect-failure, 503]
    breaker:
      failure_rate: {threshold: 25%, window: 30s}
      open_for: 5s
    fallback: {stale_if_error: 10m}
routes:
"""


def route(body: str) -> str:
    return POLICY + "  - name: r\n    upstream: api\n" + body


def test_empty_file_is_all_defaults(load_yaml: Load) -> None:
    config = load_yaml("")
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert (config.admin.host, config.admin.port, config.admin.token) == ("127.0.0.1", 9901, None)
    assert config.routes == ()
    assert config.limits.max_request_body == 10 * 1024 * 1024


def test_a_route_without_blocks_has_only_the_default_timeout(load_yaml: Load) -> None:
    config = load_yaml("upstreams:\n  a: {url: http://a}\nroutes:\n  - {name: r, upstream: a}\n")
    only = config.routes[0]
    assert only.timeout == TimeoutPolicy()
    assert (only.retry, only.breaker, only.bulkhead, only.fallback) == (None, None, None, None)
    assert only.strip_prefix is True
    assert only.match.path_prefix == "/"


def test_route_keys_override_the_policy_key_by_key(load_yaml: Load) -> None:
    config = load_yaml(
        route("    policy: api\n    timeout: {total: 900s}\n    retry: {backoff: {initial: 2s}}\n")
    )
    only = config.routes[0]
    assert only.timeout == TimeoutPolicy(total=900.0, per_try=10.0, idle=45.0)
    assert only.retry is not None
    assert only.retry.max_attempts == 4  # from the policy
    assert (only.retry.backoff.initial, only.retry.backoff.max) == (2.0, 20.0)
    assert only.retry.backoff.multiplier == RetryPolicy().backoff.multiplier  # built-in
    assert only.breaker is not None and only.breaker.open_for == 5.0
    assert only.bulkhead is None  # in neither the route nor the policy


def test_false_turns_off_a_block_the_policy_turns_on(load_yaml: Load) -> None:
    config = load_yaml(route("    policy: api\n    retry: false\n    fallback: false\n"))
    assert config.routes[0].retry is None
    assert config.routes[0].fallback is None
    assert config.routes[0].breaker is not None


def test_true_turns_a_block_on_with_the_policy_or_built_in_settings(load_yaml: Load) -> None:
    config = load_yaml(route("    policy: api\n    retry: true\n    bulkhead: true\n"))
    assert config.routes[0].bulkhead == BulkheadPolicy()
    assert config.routes[0].retry is not None
    assert config.routes[0].retry.max_attempts == 4


def test_block_defaults_mirror_the_model(load_yaml: Load) -> None:
    text = route("    retry: {}\n    breaker: {}\n    bulkhead: {}\n    fallback: {}\n")
    only = load_yaml(text).routes[0]
    assert only.retry == RetryPolicy()
    assert only.breaker == BreakerPolicy()
    assert only.bulkhead == BulkheadPolicy()
    assert only.fallback == FallbackPolicy()


def test_window_calls_on_the_route_replaces_the_policy_window(load_yaml: Load) -> None:
    text = route("    policy: api\n    breaker: {failure_rate: {window_calls: 100}}\n")
    breaker = load_yaml(text).routes[0].breaker
    assert breaker is not None
    assert breaker.failure_rate == FailureRatePolicy(
        threshold=0.25, window=None, window_calls=100, min_calls=20
    )


def test_breaker_triggers_can_be_switched_off(load_yaml: Load) -> None:
    text = route("    breaker: {consecutive_failures: false, failure_rate: false}\n")
    breaker = load_yaml(text).routes[0].breaker
    assert breaker is not None
    assert (breaker.consecutive_failures, breaker.failure_rate) == (None, None)


def test_open_for_max_follows_a_long_open_for_when_unset(load_yaml: Load) -> None:
    breaker = load_yaml(route("    breaker: {open_for: 20m}\n")).routes[0].breaker
    assert breaker is not None
    assert (breaker.open_for, breaker.open_for_max) == (1200.0, 1200.0)


def test_slow_calls(load_yaml: Load) -> None:
    text = route("    breaker: {slow_calls: {duration: 5s, threshold: 80%}}\n")
    breaker = load_yaml(text).routes[0].breaker
    assert breaker is not None and breaker.slow_calls is not None
    assert (breaker.slow_calls.duration, breaker.slow_calls.threshold) == (5.0, 0.8)


def test_timeouts_can_be_switched_off(load_yaml: Load) -> None:
    text = route("    timeout: {total: off, idle: 'off'}\n")
    assert load_yaml(text).routes[0].timeout == TimeoutPolicy(total=None, per_try=10.0, idle=None)


def test_retry_on_tokens(load_yaml: Load) -> None:
    text = route("    retry: {on: [reset, gateway-error, 429, '500-501', 4XX]}\n")
    retry = load_yaml(text).routes[0].retry
    assert retry is not None
    on = retry.on
    assert (on.connect_failure, on.reset, on.timeout) == (False, True, False)
    assert on.tokens == ("reset", "gateway-error", "429", "500-501", "4xx")
    for status in (502, 503, 504, 429, 500, 501, 404, 400):
        assert status in on.statuses
    assert 505 not in on.statuses
    assert on.statuses.label_for(503) == "gateway-error"
    assert on.statuses.label_for(404) == "4xx"


def test_failure_statuses_and_fallback_on(load_yaml: Load) -> None:
    text = route(
        "    breaker: {failure_statuses: [503, '520-529']}\n"
        "    fallback:\n"
        "      on: [breaker-open, bulkhead-full, 5xx]\n"
        "      methods: [get]\n"
        "      identity_headers: [X-Tenant]\n"
        "      static: {status: 502, headers: {Content-Type: text/plain}, body: 'down ✗'}\n"
    )
    only = load_yaml(text).routes[0]
    assert only.breaker is not None and only.fallback is not None
    assert only.breaker.failure_statuses.statuses == frozenset({503, *range(520, 530)})
    assert only.fallback.conditions == frozenset({"breaker-open", "bulkhead-full"})
    assert only.fallback.statuses.tokens == ("5xx",)
    assert only.fallback.methods == frozenset({"GET"})
    assert only.fallback.identity_headers == ("x-tenant",)
    assert only.fallback.static == StaticFallback(
        status=502, headers=(("content-type", "text/plain"),), body="down ✗".encode()
    )


def test_retry_methods_and_idempotency_header(load_yaml: Load) -> None:
    text = route("    retry: {methods: [get, post], idempotency_header: X-Request-Id}\n")
    retry = load_yaml(text).routes[0].retry
    assert retry is not None
    assert retry.methods == frozenset({"GET", "POST"})
    assert retry.idempotency_header == "x-request-id"
    off = load_yaml(route("    retry: {idempotency_header: false}\n")).routes[0].retry
    assert off is not None and off.idempotency_header is None


def test_route_match(load_yaml: Load) -> None:
    text = (
        "upstreams:\n  a: {url: http://a}\nroutes:\n"
        "  - {name: one, upstream: a, match: {host: API.Example.com, methods: [get, Post]}}\n"
        "  - {name: two, upstream: a, match: {host: 'Api.Example.com:8443', path_prefix: /v2/}}\n"
        "  - {name: six, upstream: a, match: {host: '[::1]:9000'}, strip_prefix: false}\n"
    )
    one, two, six = load_yaml(text).routes
    assert (one.match.host, one.match.methods) == ("api.example.com", frozenset({"GET", "POST"}))
    assert (two.match.host, two.match.path_prefix) == ("api.example.com:8443", "/v2/")
    assert (six.match.host, six.strip_prefix) == ("[::1]:9000", False)


def test_upstream_url_is_split(load_yaml: Load) -> None:
    text = (
        "upstreams:\n"
        "  a:\n"
        "    url: HTTPS://key%40x:s%3Acret@API.example.com:8443/base/path/\n"
        "    headers: {X-Api-Key: abc, Accept: application/json}\n"
        "  b: {url: 'http://:@plain.example.com'}\n"
    )
    config = load_yaml(text)
    a, b = config.upstreams["a"], config.upstreams["b"]
    assert a.url == "https://API.example.com:8443/base/path"
    assert (a.scheme, a.host, a.base_path) == ("https", "API.example.com:8443", "/base/path")
    assert a.userinfo == ("key@x", "s:cret")
    assert a.headers == (("x-api-key", "abc"), ("accept", "application/json"))
    assert (b.userinfo, b.base_path, b.host) == (None, "", "plain.example.com")
    assert not b.injects_credentials


def test_listen_addresses(load_yaml: Load) -> None:
    config = load_yaml("listen: '[::1]:8081'\nadmin: {listen: 'localhost:9000'}\n")
    assert (config.listen_host, config.listen_port) == ("::1", 8081)
    assert (config.admin.host, config.admin.port) == ("localhost", 9000)


def test_remote_listen_is_allowed_when_asked_or_without_credentials(load_yaml: Load) -> None:
    creds = "upstreams:\n  a: {url: http://a, headers: {Authorization: Bearer x}}\n"
    assert load_yaml("listen: 0.0.0.0:8080\nallow_remote_clients: true\n" + creds).listen_port
    assert load_yaml("listen: 0.0.0.0:8080\nupstreams:\n  a: {url: http://a}\n").listen_port
    empty = "upstreams:\n  a: {url: http://a, headers: {Authorization: 'Bearer ${T:-}'}}\n"
    assert load_yaml("listen: 0.0.0.0:8080\n" + empty).listen_port


def test_ca_file_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "upstreams:\n  a: {url: https://a, tls: {ca_file: ca.pem, verify: true}}\n"
        "routes: [{name: a, upstream: a}]\n"
    )
    assert load_config(str(path), env={}).upstreams["a"].tls.ca_file == str(tmp_path / "ca.pem")


def test_admin_token_file_is_read_and_stripped(tmp_path: Path, load_yaml: Load) -> None:
    token = tmp_path / "token"
    token.write_text("  s3cret-token\n")
    config = load_yaml(f"admin:\n  token: ''\n  token_file: {token}\n")
    assert config.admin.token == "s3cret-token"
    assert "s3cret-token" in config.secrets


@pytest.mark.parametrize(
    ("yaml_value", "env", "expected"),
    [
        ("''", {"XDG_STATE_HOME": "/xdg"}, "/xdg/resilience-proxy/state.json"),
        ("''", {"HOME": "/home/u"}, "/home/u/.local/state/resilience-proxy/state.json"),
        (
            "''",
            {"HOME": "/h", "XDG_STATE_HOME": "rel"},
            "/h/.local/state/resilience-proxy/state.json",
        ),
        ("/var/lib/rp/state.json", {}, "/var/lib/rp/state.json"),
        ("'~/s.json'", {"HOME": "/home/u"}, "/home/u/s.json"),
        ("${RESILIENCE_PROXY_STATE:-}", {"RESILIENCE_PROXY_STATE": "/data/s.json"}, "/data/s.json"),
        ("false", {}, None),
    ],
)
def test_state_file(load_yaml: Load, yaml_value: str, env: dict[str, str], expected: str) -> None:
    assert load_yaml(f"state_file: {yaml_value}\n", env).state_file == expected


def test_state_file_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "state_file: state/s.json\nupstreams: {a: {url: https://a}}\n"
        "routes: [{name: a, upstream: a}]\n"
    )
    assert load_config(str(path), env={}).state_file == str(tmp_path / "state" / "s.json")


def test_postgres_target(load_yaml: Load) -> None:
    text = """\
postgres:
  - name: main
    dsn: postgresql://agent:p%40ss@db:5432/app?sslmode=require&password=other
    agent_pool_size: 20
    pool: {min_size: 0, max_size: 3}
    probe: {interval: 15, timeout: 2s, query: SELECT 42}
    degraded: {latency: 250ms, utilization: 70%, consecutive_failures: 2}
    critical: {utilization: 0.9, consecutive_failures: 4}
    readiness: fail_on_critical
  - name: other
    dsn: postgres://db/x
"""
    config = load_yaml(text)
    main, other = config.postgres
    assert main.display_dsn == (
        "postgresql://agent:<redacted>@db:5432/app?sslmode=require&password=<redacted>"
    )
    assert {"p@ss", "other"} <= config.secrets
    assert (main.pool_min_size, main.pool_max_size, main.agent_pool_size) == (0, 3, 20)
    assert (main.probe_interval, main.probe_timeout, main.probe_query) == (15.0, 2.0, "SELECT 42")
    assert (main.degraded_latency, main.degraded_utilization) == (0.25, 0.7)
    assert (main.degraded_consecutive_failures, main.critical_consecutive_failures) == (2, 4)
    assert (main.critical_utilization, main.readiness) == (0.9, "fail_on_critical")
    assert (other.display_dsn, other.probe_interval, other.readiness) == (
        "postgres://db/x",
        60.0,
        "ignore",
    )


def test_source_and_hash(tmp_path: Path) -> None:
    import hashlib

    data = (
        b"version: 1\n# a comment changes the hash too\n"
        b"upstreams: {a: {url: https://a}}\nroutes: [{name: a, upstream: a}]\n"
    )
    path = tmp_path / "proxy.yaml"
    path.write_bytes(data)
    config = load_config(str(path), env={})
    assert config.source == str(path)
    assert config.hash == hashlib.sha256(data).hexdigest()


def test_upstream_idle_timeout(load_yaml: Load, problems_of: Callable[..., list[str]]) -> None:
    config = load_yaml(
        "upstreams:\n  a: {url: http://a.example, idle_timeout: 250ms}\n  b: {url: http://b.example}\n"
    )
    assert config.upstreams["a"].idle_timeout == 0.25
    assert config.upstreams["b"].idle_timeout == 4.0  # below the 5 s keep-alive of common servers
    assert problems_of("upstreams:\n  a: {url: http://a.example, idle_timeout: 0s}\n") == [
        "config/proxy.yaml:2: upstreams.a.idle_timeout: must be > 0, got '0s'"
    ]

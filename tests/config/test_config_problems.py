"""Every kind of config problem names its file, line and key path, and all are reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import ConfigInvalid, Problem, load_config

Problems = Callable[..., list[str]]

BASE = """\
upstreams:
  api:
    url: https://api.example.com
"""


def test_problem_prints_file_line_path_message() -> None:
    problem = Problem(
        "config/proxy.yaml", 14, "routes[1].retry.max_attempts", "must be >= 1, got 0"
    )
    assert str(problem) == "config/proxy.yaml:14: routes[1].retry.max_attempts: must be >= 1, got 0"
    assert str(Problem("c.yaml", None, "", "cannot read: No such file or directory")) == (
        "c.yaml: cannot read: No such file or directory"
    )


def test_out_of_range_value_in_second_route(problems_of: Problems) -> None:
    text = (
        BASE
        + """\
routes:
  - name: first
    upstream: api
  - name: second
    upstream: api
    retry:
      max_attempts: 0
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:10: routes[1].retry.max_attempts: must be >= 1, got 0"
    ]


def test_every_problem_is_reported_in_file_order(problems_of: Problems) -> None:
    text = """\
version: 2
listen: 127.0.0.1:99999
upstreams:
  API:
    url: ftp://files.example.com
policies:
  api:
    retry:
      backoff: {initial: 0.0001s, max: 5x}
      on: [connect-failure, bogus]
    breaker:
      open_for: 500ms
      retries: 3
routes:
  - name: a
    upstream: nope
    policy: missing
    match: {path_prefix: nope}
  - name: a
    upstream: API
    timeout: {total: 0}
  - upstream: API
postgres:
  - name: main
    dsn: postgresql://u@h/db
    probe: {interval: 0.5}
"""
    assert problems_of(text) == [
        "config/proxy.yaml:1: version: unsupported version 2: this proxy reads version 1",
        "config/proxy.yaml:2: listen: port must be between 1 and 65535, got 99999",
        "config/proxy.yaml:4: upstreams.API: must match [a-z0-9_.-]+ (lower-case), got 'API'",
        "config/proxy.yaml:5: upstreams.API.url: must be an http:// or https:// URL, "
        "got 'ftp://files.example.com'",
        "config/proxy.yaml:9: policies.api.retry.backoff.initial: must be >= 1ms, got '0.0001s'",
        "config/proxy.yaml:9: policies.api.retry.backoff.max: not a duration: '5x' "
        "(use 250ms, 2s, 5m, 1h; a bare number is seconds)",
        "config/proxy.yaml:10: policies.api.retry.on[1]: unknown condition 'bogus'; valid: "
        "connect-failure, reset, timeout, 5xx (or 4xx, ...), gateway-error, "
        "a status like 503, a range like 500-504",
        "config/proxy.yaml:12: policies.api.breaker.open_for: must be >= 1s, got '500ms'",
        "config/proxy.yaml:13: policies.api.breaker.retries: unknown key; valid keys: "
        "consecutive_failures, failure_rate, slow_calls, failure_statuses, open_for, "
        "open_for_max, half_open_calls, half_open_max_wait, mode, share",
        "config/proxy.yaml:16: routes[0].upstream: unknown upstream 'nope' (defined: API)",
        "config/proxy.yaml:17: routes[0].policy: unknown policy 'missing' (defined: api)",
        "config/proxy.yaml:18: routes[0].match.path_prefix: must start with '/', got 'nope'",
        "config/proxy.yaml:19: routes[1].name: duplicate route name 'a' "
        "(first at routes[0], line 15)",
        "config/proxy.yaml:20: routes[1].upstream: must match [a-z0-9_.-]+ (lower-case), got 'API'",
        "config/proxy.yaml:21: routes[1].timeout.total: must be > 0, got 0",
        "config/proxy.yaml:22: routes[2].name: required",
        "config/proxy.yaml:22: routes[2].upstream: must match [a-z0-9_.-]+ (lower-case), got 'API'",
        "config/proxy.yaml:26: postgres[0].probe.interval: must be >= 1s, got 0.5",
    ]


def test_unknown_key_suggests_the_closest(problems_of: Problems) -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: api\n    retries: {max_attempts: 2}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:7: routes[0].retries: unknown key (did you mean 'retry'?)"
    ]


def test_unknown_top_level_key(problems_of: Problems) -> None:
    assert problems_of("version: 1\nlistn: 127.0.0.1:8080\n") == [
        "config/proxy.yaml:2: listn: unknown key (did you mean 'listen'?)"
    ]


def test_missing_upstream_url_points_at_the_upstream(problems_of: Problems) -> None:
    assert problems_of("upstreams:\n  api:\n    headers: {}\n") == [
        "config/proxy.yaml:2: upstreams.api.url: required"
    ]


def test_wrong_types(problems_of: Problems) -> None:
    text = (
        BASE
        + """\
    max_connections: many
    forwarded_headers: sometimes
routes:
  - name: r
    upstream: api
    breaker: 5
    bulkhead: {max_concurrent: [1]}
    fallback: {static: {body: {a: 1}}}
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:4: upstreams.api.max_connections: must be an integer, got 'many'",
        "config/proxy.yaml:5: upstreams.api.forwarded_headers: must be true or false, "
        "got 'sometimes'",
        "config/proxy.yaml:9: routes[0].breaker: must be a mapping, true or false, got 5",
        "config/proxy.yaml:10: routes[0].bulkhead.max_concurrent: must be an integer, got a list",
        "config/proxy.yaml:11: routes[0].fallback.static.body: must be a string, got a mapping",
    ]


def test_literal_choices_are_listed(problems_of: Problems) -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: api\n    breaker: {mode: strict}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:7: routes[0].breaker.mode: must be one of "
        "'enforce', 'observe' or 'disabled', got 'strict'"
    ]


def test_floors(problems_of: Problems) -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: api
    retry: {backoff: {initial: 0}}
    breaker: {open_for: 0.5, half_open_calls: 0, failure_rate: {threshold: 0%}}
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:7: routes[0].retry.backoff.initial: must be >= 1ms, got 0",
        "config/proxy.yaml:8: routes[0].breaker.failure_rate.threshold: "
        "must be above 0 (0 would always trip), got '0%'",
        "config/proxy.yaml:8: routes[0].breaker.half_open_calls: must be >= 1, got 0",
        "config/proxy.yaml:8: routes[0].breaker.open_for: must be >= 1s, got 0.5",
    ]


def test_failure_rate_window_and_window_calls_are_exclusive(problems_of: Problems) -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: api
    breaker:
      failure_rate:
        window: 30s
        window_calls: 100
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:8: routes[0].breaker.failure_rate: set window or window_calls, not both"
    ]


def test_open_for_max_below_open_for_is_reported_where_it_was_written(
    problems_of: Problems,
) -> None:
    text = (
        BASE
        + """\
policies:
  api:
    breaker: {open_for: 20s, open_for_max: 30s}
routes:
  - name: r
    upstream: api
    policy: api
    breaker: {open_for: 2m}
  - name: s
    upstream: api
    policy: api
    breaker: {open_for_max: 10s}
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:11: routes[0].breaker.open_for: must be <= open_for_max (30s), got 2m",
        "config/proxy.yaml:15: routes[1].breaker.open_for_max: must be >= open_for (20s), got 10s",
    ]


def test_backoff_max_below_initial(problems_of: Problems) -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: api\n    retry: {backoff: {initial: 20s}}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:7: routes[0].retry.backoff.max: must be >= backoff.initial (20s), "
        "got 10s"
    ]


def test_route_match_checks(problems_of: Problems) -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: api
    match:
      path_prefix: /a?b
      host: "bad host"
      methods: [GET, "P OST"]
"""
    )
    assert problems_of(text) == [
        "config/proxy.yaml:8: routes[0].match.path_prefix: must be a plain path "
        "(no query, fragment, space or backslash), got '/a?b'",
        "config/proxy.yaml:9: routes[0].match.host: not a host name or address: 'bad host'",
        "config/proxy.yaml:10: routes[0].match.methods[1]: not an HTTP method: 'P OST'",
    ]


def test_upstream_url_checks_hide_userinfo(problems_of: Problems) -> None:
    text = """\
upstreams:
  a:
    url: https://user:hunter22@api.example.com/x?token=1
  b:
    url: https://
"""
    lines = problems_of(text)
    assert lines == [
        "config/proxy.yaml:3: upstreams.a.url: must not have a query or fragment: "
        "'https://<redacted>@api.example.com/x?token=1'",
        "config/proxy.yaml:5: upstreams.b.url: has no host: 'https://'",
    ]
    assert "hunter22" not in "\n".join(lines)


def test_injected_headers_the_proxy_owns_are_refused(problems_of: Problems) -> None:
    text = BASE + "    headers:\n      Host: other.example.com\n      Authorization: x\n"
    assert problems_of(text) == [
        "config/proxy.yaml:5: upstreams.api.headers.Host: "
        "this header is set by the proxy and cannot be injected"
    ]


def test_duplicate_header_names_differing_in_case(problems_of: Problems) -> None:
    text = BASE + "    headers:\n      Authorization: a\n      authorization: b\n"
    assert problems_of(text) == [
        "config/proxy.yaml:6: upstreams.api.headers.authorization: "
        "duplicate header (names are case-insensitive: Authorization)"
    ]


def test_tls_ca_file_must_exist(problems_of: Problems, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    text = BASE + f"    tls: {{ca_file: {missing}}}\n"
    assert problems_of(text) == [
        f"config/proxy.yaml:4: upstreams.api.tls.ca_file: no readable file at '{missing}'"
    ]


def test_non_loopback_listen_with_injected_credentials(problems_of: Problems) -> None:
    text = "listen: 0.0.0.0:8080\n" + BASE + "    headers: {Authorization: Bearer abc}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:1: listen: a non-loopback address while upstream(s) api inject "
        "credentials: anyone who can reach the proxy could use them; listen on 127.0.0.1 or "
        "set allow_remote_clients: true"
    ]


def test_non_loopback_listen_with_url_userinfo(problems_of: Problems) -> None:
    text = "listen: '[::]:8080'\nupstreams:\n  api: {url: 'https://key:secret@api.example.com'}\n"
    assert len(problems_of(text)) == 1


def test_admin_token_and_token_file_are_exclusive(problems_of: Problems) -> None:
    text = "admin:\n  token: abcdef\n  token_file: /run/secrets/token\n"
    assert problems_of(text) == [
        "config/proxy.yaml:3: admin.token_file: set admin.token or admin.token_file, not both"
    ]


def test_admin_token_file_missing_or_empty(problems_of: Problems, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems_of(f"admin:\n  token_file: {missing}\n") == [
        f"config/proxy.yaml:2: admin.token_file: cannot read '{missing}': No such file or directory"
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    assert problems_of(f"admin:\n  token_file: {empty}\n") == [
        f"config/proxy.yaml:2: admin.token_file: '{empty}' is empty"
    ]


def test_postgres_checks(problems_of: Problems) -> None:
    text = """\
postgres:
  - name: main
    dsn: mysql://root:pw@db/app
  - name: main
    dsn: postgresql://u@h/db
    pool: {min_size: 5, max_size: 2}
    degraded: {utilization: 90%}
    critical: {utilization: 80%}
    readiness: maybe
"""
    lines = problems_of(text)
    assert lines == [
        "config/proxy.yaml:3: postgres[0].dsn: "
        "must be a postgresql://user:password@host:port/database URL",
        "config/proxy.yaml:4: postgres[1].name: duplicate postgre name 'main' "
        "(first at postgres[0], line 2)",
        "config/proxy.yaml:9: postgres[1].readiness: "
        "must be one of 'ignore' or 'fail_on_critical', got 'maybe'",
    ]
    assert "pw" not in "\n".join(lines)


def test_postgres_cross_field_checks(problems_of: Problems) -> None:
    text = """\
postgres:
  - name: main
    dsn: postgresql://u@h/db
    pool: {min_size: 5, max_size: 2}
    degraded: {utilization: 90%}
    critical: {utilization: 80%}
"""
    assert problems_of(text) == [
        "config/proxy.yaml:4: postgres[0].pool.min_size: must be <= pool.max_size (2), got 5",
        "config/proxy.yaml:6: postgres[0].critical.utilization: "
        "must be >= degraded.utilization (90%), got 80%",
    ]


def test_cache_entry_larger_than_cache(problems_of: Problems) -> None:
    assert problems_of("cache: {max_bytes: 1MiB, max_entry_bytes: 2MiB}\n") == [
        "config/proxy.yaml:1: cache.max_entry_bytes: must be <= cache.max_bytes (1MiB), got 2MiB"
    ]


def test_yaml_syntax_error_has_the_yaml_line(problems_of: Problems) -> None:
    lines = problems_of("version: 1\nupstreams:\n  api: {url: x\nroutes: []\n")
    assert len(lines) == 1
    assert lines[0].startswith("config/proxy.yaml:4: YAML syntax error:")


def test_duplicate_yaml_keys(problems_of: Problems) -> None:
    text = BASE + "    connect_timeout: 1s\n    connect_timeout: 2s\n"
    assert problems_of(text) == [
        "config/proxy.yaml:5: upstreams.api.connect_timeout: duplicate key (first at line 4)"
    ]


def test_top_level_must_be_a_mapping(problems_of: Problems) -> None:
    assert problems_of("- a\n- b\n") == [
        "config/proxy.yaml:1: the top level must be a mapping (version, listen, upstreams, "
        "routes, ...)"
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigInvalid) as caught:
        load_config(path, env={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}: cannot read: No such file or directory"
    ]


def test_load_config_reports_the_path_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "version: 1\nlimits:\n  max_request_body: huge\n"
        "upstreams: {a: {url: https://a}}\nroutes: [{name: a, upstream: a}]\n"
    )
    with pytest.raises(ConfigInvalid) as caught:
        load_config(str(path), env={})
    assert str(caught.value) == (
        f"{path}:3: limits.max_request_body: not a size: 'huge' "
        "(use 512KiB, 10MiB, 1GiB, 64KB, 10MB; a bare number is bytes)"
    )


def test_yaml_anchors_and_merge_keys_work(load_yaml: Callable[..., object]) -> None:
    text = """\
upstreams:
  api: {url: https://api.example.com}
x-shared: &fast {total: 5s, per_try: 1s}
routes:
  - name: r
    upstream: api
    timeout:
      <<: *fast
      total: 7s
"""
    with pytest.raises(ConfigInvalid, match="x-shared: unknown key"):
        load_yaml(text)
    config = load_yaml(text.replace("x-shared: &fast", "policies:\n  p:\n    timeout: &fast"))
    assert config.routes[0].timeout.total == 7.0
    assert config.routes[0].timeout.per_try == 1.0


def test_a_policy_no_route_uses_is_still_checked(problems_of: Problems) -> None:
    text = "policies:\n  unused:\n    retry:\n      backoff: {initial: 5s, max: 1s}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:4: policies.unused.retry.backoff.max: "
        "must be >= backoff.initial (5s), got 1s"
    ]

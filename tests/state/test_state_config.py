"""The `state` block and `breaker.share` in the config (DESIGN §4, §15)."""

from __future__ import annotations

import json

from proxy.config.model import StateSettings
from tests.config.conftest import load, problems

BASE = """
version: 1
upstreams:
  u: {url: "http://127.0.0.1:9"}
routes:
  - name: r
    upstream: u
    breaker: {share: true}
"""


def test_absent_state_is_local_and_share_defaults_off() -> None:
    config = load("""
        version: 1
        upstreams:
          u: {url: "http://127.0.0.1:9"}
        routes:
          - {name: r, upstream: u, breaker: true}
    """)
    assert config.state == StateSettings()
    assert config.state.backend == "local" and config.state.timeout == 0.05
    assert config.routes[0].breaker is not None and config.routes[0].breaker.share is False
    assert config.redacted["state"] == {
        "backend": "local",
        "url": None,
        "key_prefix": "resilience-proxy",
        "timeout": 0.05,
    }


def test_redis_with_a_password_is_redacted_and_scrubbed() -> None:
    config = load(
        BASE
        + """
state: {backend: redis, url: "redis://:hunter2-redis@10.0.0.5:6379/2", key_prefix: agents, timeout: 20ms}
"""
    )
    state = config.state
    assert (state.backend, state.key_prefix, state.timeout) == ("redis", "agents", 0.02)
    assert state.url == "redis://:hunter2-redis@10.0.0.5:6379/2"
    assert "hunter2-redis" in config.secrets
    assert config.redacted["state"]["url"] == "redis://:<redacted>@10.0.0.5:6379/2"
    assert "hunter2" not in json.dumps(config.redacted)
    assert config.routes[0].breaker is not None and config.routes[0].breaker.share is True
    assert config.redacted["routes"][0]["breaker"]["share"] is True


def test_a_url_from_the_environment_is_redacted_whole() -> None:
    config = load(
        BASE + 'state: {backend: redis, url: "${REDIS_URL}"}\n',
        env={"REDIS_URL": "redis://user:pw-from-env@cache:6379/0"},
    )
    assert config.state.url == "redis://user:pw-from-env@cache:6379/0"
    assert config.redacted["state"]["url"] == "<redacted>"
    assert "pw-from-env" in config.secrets


def test_redis_needs_a_url_with_a_redis_scheme() -> None:
    assert problems(BASE + "state: {backend: redis}\n") == [
        "config/proxy.yaml:9: state.url: required with backend: redis"
    ]
    assert problems(BASE + 'state:\n  backend: redis\n  url: "${REDIS_URL:-}"\n') == [
        "config/proxy.yaml:11: state.url: required with backend: redis"
    ]
    found = problems(BASE + 'state:\n  backend: redis\n  url: "http://:secret-pw@h:6379"\n')
    assert found == [
        "config/proxy.yaml:11: state.url: must be a redis://, rediss:// or unix:// URL"
    ]
    assert "secret-pw" not in found[0]


def test_state_problems_name_key_and_line() -> None:
    found = problems(
        BASE + "state:\n  backend: memcached\n  timeout: 0s\n  key_prefix: ''\n  ttl: 5s\n"
    )
    assert found == [
        "config/proxy.yaml:10: state.backend: must be one of 'local' or 'redis', got 'memcached'",
        "config/proxy.yaml:11: state.timeout: must be > 0, got '0s'",
        "config/proxy.yaml:12: state.key_prefix: must not be empty",
        "config/proxy.yaml:13: state.ttl: unknown key; valid keys: backend, url, key_prefix, timeout",
    ]
    assert problems(BASE.replace("share: true", "share: maybe")) == [
        "config/proxy.yaml:8: routes[0].breaker.share: must be true or false, got 'maybe'"
    ]


def test_local_with_a_url_is_allowed() -> None:
    config = load(BASE + 'state: {backend: local, url: "redis://127.0.0.1:6379/0"}\n')
    assert config.state.backend == "local"

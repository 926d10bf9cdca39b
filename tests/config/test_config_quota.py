"""`upstreams.<name>.quota`, `routes[].rate_limit` (also in policies) and `state`: compiled
values, problems with key and line, the JSON Schema, and no secret in /config."""

from __future__ import annotations

import json

import jsonschema

from proxy.config import json_schema
from proxy.config.loader import parse_yaml
from proxy.config.model import QuotaPolicy, RateLimitPolicy, StateSettings
from tests.config.conftest import load, problems

GOOD = """\
version: 1
state: {backend: redis, url: "redis://:hunter22pw@127.0.0.1:6379/0", key_prefix: fleet-a, timeout: 20ms}
upstreams:
  gh: {url: "https://api.github.com", quota: {headers: github, reserve: 10}}
  hf: {url: "https://api-inference.huggingface.co", quota: true}
policies:
  limited: {rate_limit: {rps: 5, per: "header:X-Agent-Id"}}
routes:
  - {name: a, upstream: gh, policy: limited, rate_limit: {burst: 7}}
  - {name: b, upstream: hf, match: {path_prefix: /b/}, rate_limit: {rps: 2.5, shared: true, max_callers: 50}}
  - {name: c, upstream: hf, match: {path_prefix: /c/}, policy: limited, rate_limit: false}
  - {name: d, upstream: gh, match: {path_prefix: /d/}, fallback: {on: [quota, timeout]}}
"""


def test_compiled_values_with_defaults_and_policy_merge():
    config = load(GOOD)
    routes = {r.name: r for r in config.routes}
    assert routes["a"].rate_limit == RateLimitPolicy(rps=5.0, burst=7.0, per_header="x-agent-id")
    assert routes["b"].rate_limit == RateLimitPolicy(rps=2.5, burst=3.0, shared=True, max_callers=50)
    assert routes["c"].rate_limit is None  # false turns the policy's limit off
    assert routes["d"].rate_limit is None
    assert "quota" in routes["d"].fallback.conditions
    assert config.upstreams["gh"].quota == QuotaPolicy(headers="github", reserve=10)
    assert config.upstreams["hf"].quota == QuotaPolicy()  # true: generic, reserve 0
    assert config.state == StateSettings(
        backend="redis", url="redis://:hunter22pw@127.0.0.1:6379/0", key_prefix="fleet-a", timeout=0.02
    )


def test_defaults_without_any_of_it():
    config = load("version: 1\nupstreams: {u: {url: 'http://127.0.0.1:9'}}\nroutes: [{name: r, upstream: u}]\n")
    assert config.state == StateSettings()
    assert config.routes[0].rate_limit is None and config.upstreams["u"].quota is None


def test_the_redis_password_never_reaches_the_effective_config():
    config = load(GOOD)
    shown = json.dumps(config.redacted)
    assert "hunter22pw" not in shown
    assert config.redacted["state"]["url"] == "redis://:<redacted>@127.0.0.1:6379/0"
    assert "hunter22pw" in config.secrets  # scrubbed from logs too
    assert config.redacted["routes"][0]["rate_limit"]["per"] == "header:x-agent-id"
    assert config.redacted["upstreams"]["gh"]["quota"] == {"headers": "github", "reserve": 10, "max_queued": 128}


def test_type_problems_name_key_and_line():
    text = """\
    version: 1
    state: {backend: memcached, timeout: 0}
    upstreams:
      gh: {url: "http://127.0.0.1:9", quota: {headers: gitlab, reserve: -1}}
    routes:
      - name: a
        upstream: gh
        rate_limit: {rps: 0, burst: 0.5, per: "cookie:session", max_callers: 0}
      - {name: b, upstream: gh, fallback: {on: [quota, over-quota]}}
    """
    found = problems(text)
    assert "config/proxy.yaml:2: state.backend: must be one of 'local' or 'redis', got 'memcached'" in found
    assert any(p.startswith("config/proxy.yaml:2: state.timeout: must be > 0") for p in found)
    assert any(p.startswith("config/proxy.yaml:4: upstreams.gh.quota.headers: must be one of 'github'") for p in found)
    assert "config/proxy.yaml:4: upstreams.gh.quota.reserve: must be >= 0, got -1" in found
    assert "config/proxy.yaml:8: routes[0].rate_limit.rps: must be > 0.0, got 0" in found
    assert "config/proxy.yaml:8: routes[0].rate_limit.burst: must be >= 1.0, got 0.5" in found
    assert (
        "config/proxy.yaml:8: routes[0].rate_limit.per: must be route or header:NAME "
        "(e.g. header:X-Agent-Id), got 'cookie:session'"
    ) in found
    assert "config/proxy.yaml:8: routes[0].rate_limit.max_callers: must be >= 1, got 0" in found
    assert any(p.startswith("config/proxy.yaml:9: routes[1].fallback.on[1]: unknown condition 'over-quota'") for p in found)


def test_compile_problems_name_key_and_line():
    text = """\
    version: 1
    state: {backend: redis}
    upstreams: {u: {url: "http://127.0.0.1:9"}}
    policies:
      p: {rate_limit: {burst: 3}}
    routes:
      - {name: a, upstream: u, rate_limit: true}
      - {name: b, upstream: u, match: {path_prefix: /b/}, rate_limit: {burst: 2}}
    """
    found = problems(text)
    assert "config/proxy.yaml:2: state.url: required with backend: redis" in found
    assert "config/proxy.yaml:5: policies.p.rate_limit.rps: required" in found
    assert "config/proxy.yaml:7: routes[0].rate_limit: needs rps, not just true" in found
    assert "config/proxy.yaml:8: routes[1].rate_limit.rps: required" in found


def test_a_bad_redis_url_is_not_quoted_back():
    found = problems('version: 1\nstate: {backend: redis, url: "http://user:pw-secret@x"}\n')
    assert found == ["config/proxy.yaml:2: state.url: must be a redis://, rediss:// or unix:// URL"]


def test_json_schema_accepts_the_new_keys_and_rejects_bad_ones():
    schema = json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(parse_yaml(GOOD, 'x.yaml').data)
    bad = parse_yaml(GOOD, 'x.yaml').data
    bad["routes"][0]["rate_limit"]["per"] = "cookie:x"
    bad["upstreams"]["gh"]["quota"]["headers"] = "gitlab"
    bad["state"]["backend"] = "etcd"
    assert len(list(validator.iter_errors(bad))) == 3
    env = parse_yaml(GOOD, 'x.yaml').data
    env["routes"][1]["rate_limit"]["rps"] = "${AGENT_RPS:-10}"
    validator.validate(env)

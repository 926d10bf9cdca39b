"""The shipped config/proxy.yaml loads as is, with typical variables, and its schema fits it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.config import json_schema, load_config
from proxy.config.loader import parse_yaml

SHIPPED = str(Path(__file__).resolve().parents[2] / "config" / "proxy.yaml")

TYPICAL_ENV = {
    "HOME": "/home/agent",
    "HF_TOKEN": "hf_secret_token_1234",
    "GITHUB_TOKEN": "ghp_secret_token_5678",
    "CLOUDINARY_API_KEY": "cloud-key-42",
    "CLOUDINARY_API_SECRET": "cloud-secret-43",
    "DATABASE_URL": "postgresql://agent:db-password-42@db.internal:5432/agent",
    "RESILIENCE_PROXY_ADMIN_TOKEN": "admin-token-abcdef",
    "RESILIENCE_PROXY_LISTEN": "0.0.0.0:8080",
    "RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS": "true",
    "RESILIENCE_PROXY_STATE": "/var/lib/resilience-proxy/state.json",
    "RETRY_MAX_ATTEMPTS": "4",
    "RETRY_INITIAL_DELAY": "0.25",
    "RETRY_MAX_DELAY": "5",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "8",
    "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "30",
    "POOL_HEALTH_CHECK_INTERVAL": "15",
    "QUERY_TIMEOUT_SECONDS": "3",
}


def test_loads_with_no_environment_variable_set() -> None:
    config = load_config(SHIPPED, env={})
    assert [r.name for r in config.routes] == [
        "cloudinary",
        "huggingface",
        "huggingface-hub",
        "github",
    ]
    assert [r.match.path_prefix for r in config.routes] == [
        "/cloudinary/",
        "/huggingface/",
        "/huggingface-hub/",  # huggingface_hub's HF_ENDPOINT (docs/deployment.md)
        "/github/",
    ]
    assert {name: u.url for name, u in config.upstreams.items()} == {
        "cloudinary": "https://api.cloudinary.com",
        "huggingface": "https://api-inference.huggingface.co",
        "huggingface-hub": "https://huggingface.co",
        "github": "https://api.github.com",
    }
    assert config.upstreams["cloudinary"].userinfo is None  # no key, no Basic auth
    # No token set: nothing injected, so nothing to leak.
    assert not any(u.injects_credentials for u in config.upstreams.values())
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.admin.token is None
    assert config.secrets == frozenset()
    (main,) = config.postgres
    assert main.dsn == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert (main.probe_interval, main.probe_timeout) == (60.0, 5.0)
    for route in config.routes:
        assert route.retry is not None and route.breaker is not None
        assert route.retry.max_attempts == 3
        assert route.retry.backoff.initial == 0.5 and route.retry.backoff.max == 10.0
        assert route.breaker.consecutive_failures == 5
        assert route.breaker.open_for == 60.0


def test_route_specifics() -> None:
    cloudinary, huggingface, hub, github = load_config(SHIPPED, env={}).routes
    assert hub.upstream.name == "huggingface-hub" and hub.retry is not None
    assert huggingface.timeout.total == 900.0 and huggingface.timeout.per_try == 900.0
    assert huggingface.retry is not None and "POST" in huggingface.retry.methods
    assert cloudinary.retry is not None and "POST" not in cloudinary.retry.methods
    assert cloudinary.bulkhead is not None and cloudinary.bulkhead.max_concurrent == 32
    assert cloudinary.bulkhead.max_queued == 128  # the rest from the policy
    assert github.retry is not None
    assert github.retry.retry_after.honor and 429 in github.retry.on.statuses
    assert github.breaker is not None and 429 not in github.breaker.failure_statuses


def test_loads_with_typical_variables() -> None:
    config = load_config(SHIPPED, env=TYPICAL_ENV)
    assert dict(config.upstreams["github"].headers) == {
        "authorization": "Bearer ghp_secret_token_5678"
    }
    assert dict(config.upstreams["huggingface"].headers) == {
        "authorization": "Bearer hf_secret_token_1234"
    }
    assert dict(config.upstreams["huggingface-hub"].headers) == {
        "authorization": "Bearer hf_secret_token_1234"
    }
    # The Admin API's Basic credentials come from the URL's ${...} userinfo.
    assert config.upstreams["cloudinary"].userinfo == ("cloud-key-42", "cloud-secret-43")
    assert (config.listen_host, config.allow_remote_clients) == ("0.0.0.0", True)
    assert config.admin.token == "admin-token-abcdef"
    assert config.state_file == "/var/lib/resilience-proxy/state.json"
    for route in config.routes:
        assert route.retry is not None and route.breaker is not None
        assert route.retry.max_attempts == 4
        assert (route.retry.backoff.initial, route.retry.backoff.max) == (0.25, 5.0)
        assert route.breaker.consecutive_failures == 8
        assert route.breaker.open_for == 30.0
    (main,) = config.postgres
    assert main.display_dsn == "postgresql://agent:<redacted>@db.internal:5432/agent"
    assert (main.probe_interval, main.probe_timeout) == (15.0, 3.0)
    dump = json.dumps(config.redacted)
    for secret in ("hf_secret_token_1234", "ghp_secret_token_5678", "db-password-42", "cloud-secret-43"):
        assert secret not in dump
    assert "admin-token-abcdef" not in dump


def test_tokens_with_a_public_listen_need_allow_remote_clients() -> None:
    env = {**TYPICAL_ENV, "RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS": "false"}
    with pytest.raises(Exception, match=r"proxy.yaml:\d+: listen: a non-loopback address"):
        load_config(SHIPPED, env=env)


def _raw_tree() -> Any:
    with open(SHIPPED, encoding="utf-8") as handle:
        return parse_yaml(handle.read(), SHIPPED).data


def test_json_schema_validates_the_shipped_file() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(_raw_tree())


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda t: t["routes"][0].update(retries=3), "routes"),
        (lambda t: t["upstreams"].update({"Bad Name": {"url": "https://x"}}), "upstreams"),
        (lambda t: t["limits"].update(max_request_body="lots"), "limits"),
        (lambda t: t["policies"]["api"]["breaker"].update(mode="strict"), "policies"),
        (lambda t: t["policies"]["api"]["retry"].update(max_attempts=0), "policies"),
        (lambda t: t["routes"][1].update(retry=5), "routes"),
    ],
)
def test_json_schema_rejects_what_the_loader_rejects(change: Any, where: str) -> None:
    tree = _raw_tree()
    change(tree)
    errors = list(jsonschema.Draft202012Validator(json_schema()).iter_errors(tree))
    assert errors and errors[0].absolute_path[0] == where


def test_json_schema_accepts_variables_in_typed_fields() -> None:
    tree = _raw_tree()
    tree["policies"]["api"]["bulkhead"]["max_concurrent"] = "${MAX_CONCURRENT:-64}"
    tree["policies"]["api"]["breaker"]["mode"] = "${BREAKER_MODE}"
    tree["routes"][2]["retry"] = "${GITHUB_RETRY:-true}"
    tree["policies"]["api"]["retry"]["max_attempts"] = "${file:/run/secrets/attempts}"
    jsonschema.Draft202012Validator(json_schema()).validate(tree)
    tree["policies"]["api"]["bulkhead"]["max_concurrent"] = "sixty-four"
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(tree)


@pytest.mark.parametrize(
    "env",
    [{}, {"CLOUDINARY_API_KEY": "cloud-key-42"}, {"CLOUDINARY_API_SECRET": "cloud-secret-43"}],
    ids=["neither", "key-only", "secret-only"],
)
def test_cloudinary_credentials_with_a_part_missing_are_not_sent_and_are_reported(
    env: dict[str, str],
) -> None:
    # Like an injected header with an empty ${VAR}: no half credential (Basic "key:") goes
    # out, and the upstream counts as missing its credentials (the start/reload warning and
    # upstream_credentials_present = 0), since the agent's SDK holds only dummy ones.
    cloudinary = load_config(SHIPPED, env=env).upstreams["cloudinary"]
    assert cloudinary.userinfo is None and not cloudinary.injects_credentials
    assert cloudinary.missing_headers == ("Authorization",)
    full = load_config(
        SHIPPED, env={"CLOUDINARY_API_KEY": "cloud-key-42", "CLOUDINARY_API_SECRET": "cloud-secret-43"}
    ).upstreams["cloudinary"]
    assert full.missing_headers == ()

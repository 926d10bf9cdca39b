"""Config.redacted (GET /config) never holds a secret; Config.secrets lists them for scrubbing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from proxy.config import Config

Load = Callable[..., Config]

TEXT = """\
admin:
  token: ${ADMIN_TOKEN:-}
upstreams:
  gh:
    url: https://api.github.com
    headers:
      Authorization: "Bearer ${GITHUB_TOKEN:-}"
      X-Static-Key: literal-key-in-file
  cl:
    url: https://key123:secret456@api.cloudinary.com
  ext:
    url: ${EXTERNAL_URL:-https://ext.example.com}
policies:
  api:
    retry:
      max_attempts: ${RETRY_MAX_ATTEMPTS:-3}
      backoff: {initial: "${RETRY_INITIAL_DELAY:-0.5}"}
    breaker:
      open_for: ${CIRCUIT_BREAKER_RECOVERY_TIMEOUT:-60}
routes:
  - {name: gh, upstream: gh, policy: api}
  - {name: cl, upstream: cl, policy: api, retry: {max_attempts: 2}}
postgres:
  - name: main
    dsn: ${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
"""

ENV = {
    "ADMIN_TOKEN": "admin-tok-999",
    "GITHUB_TOKEN": "ghp_abcdefghijkl",
    "EXTERNAL_URL": "https://internal-host.corp:8443",
    "RETRY_MAX_ATTEMPTS": "6",
    "RETRY_INITIAL_DELAY": "750ms",
    "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": "45",
    "DATABASE_URL": "postgresql://agent:pg-pass-777@db:5432/app",
}


def test_no_secret_appears_in_the_redacted_config(load_yaml: Load) -> None:
    config = load_yaml(TEXT, ENV)
    dump = json.dumps(config.redacted)
    credentials = config.secrets - {"https://internal-host.corp:8443"}  # a URL: shown (§8)
    for secret in credentials:
        assert secret not in dump
    for value in ("admin-tok-999", "ghp_abcdefghijkl", "literal-key-in-file", "secret456"):
        assert value not in dump
    assert "pg-pass-777" not in dump


def test_secrets_list_credentials_but_not_numeric_knobs(load_yaml: Load) -> None:
    secrets = load_yaml(TEXT, ENV).secrets
    assert {
        "admin-tok-999",
        "ghp_abcdefghijkl",
        "Bearer ghp_abcdefghijkl",
        "literal-key-in-file",
        "secret456",
        "pg-pass-777",
        "https://internal-host.corp:8443",
    } <= secrets
    assert not {"6", "750ms", "45"} & secrets  # knobs: redacted in /config, not scrubbed from logs


def test_values_from_variables_are_redacted_where_merging_moved_them(load_yaml: Load) -> None:
    redacted = load_yaml(TEXT, ENV).redacted
    routes = redacted["routes"]
    assert isinstance(routes, list)
    gh, cl = routes
    assert gh["policy"] == "api"
    # Values from ${VAR} that are not credentials are shown as expanded (DESIGN §8), also
    # where merging moved them from the policy.
    assert gh["retry"]["max_attempts"] == 6
    assert cl["retry"]["max_attempts"] == 2  # the route's own literal
    assert gh["retry"]["backoff"]["initial"] == 0.75
    assert gh["retry"]["backoff"]["max"] == 10.0
    assert gh["breaker"]["open_for"] == 45.0
    assert redacted["upstreams"]["gh"]["headers"] == {
        "authorization": "<redacted>",
        "x-static-key": "<redacted>",
    }
    assert redacted["upstreams"]["cl"]["userinfo"] == "<redacted>"
    assert redacted["upstreams"]["cl"]["url"] == "https://api.cloudinary.com"
    assert redacted["upstreams"]["ext"]["url"] == "https://internal-host.corp:8443"
    assert redacted["admin"] == {"listen": "127.0.0.1:9901", "token": "<redacted>"}
    assert redacted["postgres"][0]["dsn"] == "<redacted>"  # a DSN from ${VAR}: hidden whole


def test_defaults_written_in_the_file_are_shown(load_yaml: Load) -> None:
    redacted = load_yaml(TEXT).redacted
    gh = redacted["routes"][0]
    assert gh["retry"]["max_attempts"] == 3
    assert gh["breaker"]["open_for"] == 60.0
    assert redacted["admin"]["token"] is None
    assert redacted["upstreams"]["gh"]["headers"] == {"x-static-key": "<redacted>"}
    assert redacted["postgres"][0]["dsn"] == ("postgresql://postgres@127.0.0.1:5432/postgres")


def test_token_file_contents_are_secret(load_yaml: Load, tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("file-token-xyz\n")
    config = load_yaml(f"admin: {{token_file: {tmp_path / 'tok'}}}\n")
    assert "file-token-xyz" in config.secrets
    assert "file-token-xyz" not in json.dumps(config.redacted)


def test_redacted_config_is_plain_json(load_yaml: Load) -> None:
    config = load_yaml(TEXT, ENV)
    assert json.loads(json.dumps(config.redacted)) == config.redacted

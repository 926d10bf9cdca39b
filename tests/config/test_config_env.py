"""${VAR} expansion: after parsing, inside scalar values only, with shell `:-` semantics."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.config import Config, default_config_path, load_config_text

Load = Callable[..., Config]
Problems = Callable[..., list[str]]

UPSTREAM = """\
upstreams:
  api:
    url: https://api.example.com
    headers:
      Authorization: "Bearer ${API_TOKEN:-}"
      X-Team: "${TEAM:-core}"
routes:
  - name: r
    upstream: api
    retry:
      max_attempts: ${RETRY_MAX_ATTEMPTS:-3}
      backoff:
        initial: ${RETRY_INITIAL_DELAY:-0.5}
"""


def test_defaults_apply_when_unset_or_empty(load_yaml: Load) -> None:
    for env in ({}, {"TEAM": "", "RETRY_MAX_ATTEMPTS": ""}):
        config = load_yaml(UPSTREAM, env)
        assert config.upstreams["api"].headers == (("x-team", "core"),)
        assert config.routes[0].retry is not None
        assert config.routes[0].retry.max_attempts == 3


def test_a_whole_value_from_a_variable_is_typed_like_the_key(load_yaml: Load) -> None:
    config = load_yaml(UPSTREAM, {"RETRY_MAX_ATTEMPTS": "5", "RETRY_INITIAL_DELAY": "250ms"})
    retry = config.routes[0].retry
    assert retry is not None
    assert retry.max_attempts == 5
    assert retry.backoff.initial == pytest.approx(0.25)


def test_injected_header_with_an_empty_variable_is_omitted(load_yaml: Load) -> None:
    assert dict(load_yaml(UPSTREAM).upstreams["api"].headers) == {"x-team": "core"}
    config = load_yaml(UPSTREAM, {"API_TOKEN": "tok-123"})
    assert dict(config.upstreams["api"].headers) == {
        "authorization": "Bearer tok-123",
        "x-team": "core",
    }
    assert config.upstreams["api"].injects_credentials


def test_header_is_omitted_when_any_of_its_variables_is_empty(load_yaml: Load) -> None:
    text = 'upstreams:\n  a:\n    url: http://a\n    headers: {X-Key: "${KEY_ID:-}:${KEY:-}"}\n'
    assert load_yaml(text, {"KEY_ID": "id"}).upstreams["a"].headers == ()
    assert load_yaml(text, {"KEY_ID": "id", "KEY": "k"}).upstreams["a"].headers == (
        ("x-key", "id:k"),
    )


def test_missing_variable_names_itself_and_the_key(problems_of: Problems) -> None:
    text = "upstreams:\n  a:\n    url: http://a\n    headers:\n      X-Key: ${API_KEY}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:5: upstreams.a.headers.X-Key: environment variable API_KEY is not set "
        "(write ${API_KEY:-} to make it optional, or ${API_KEY:-DEFAULT})"
    ]


def test_a_set_but_empty_variable_without_default_is_empty(load_yaml: Load) -> None:
    text = "upstreams:\n  a:\n    url: http://a\n    headers:\n      X-Key: ${API_KEY}\n"
    assert load_yaml(text, {"API_KEY": ""}).upstreams["a"].headers == ()


@pytest.mark.parametrize("value", ["abc\r\nX-Evil: 1", "abc\n", "a\0b"])
def test_control_characters_after_expansion_are_refused(problems_of: Problems, value: str) -> None:
    lines = problems_of(UPSTREAM, {"API_TOKEN": value})
    assert lines == [
        "config/proxy.yaml:5: upstreams.api.headers.Authorization: contains a control "
        "character (CR, LF or NUL) after expanding ${API_TOKEN}"
    ]
    assert "abc" not in lines[0]


def test_variables_are_never_parsed_as_yaml(load_yaml: Load) -> None:
    value = "x # not a comment, {a: [1]}, *alias"
    config = load_yaml(UPSTREAM, {"API_TOKEN": value})
    assert dict(config.upstreams["api"].headers)["authorization"] == f"Bearer {value}"


def test_keys_are_not_expanded(problems_of: Problems) -> None:
    assert problems_of("${KEY:-listen}: 127.0.0.1:1\n", {"KEY": "listen"}) == [
        "config/proxy.yaml:1: [\"${KEY:-listen}\"]: unknown key (did you mean 'listen'?)"
    ]


def test_malformed_reference(problems_of: Problems) -> None:
    assert problems_of("listen: ${1BAD}\n") == [
        "config/proxy.yaml:1: listen: malformed variable reference: write ${NAME}, "
        "${NAME:-default} (NAME: A-Z, 0-9, _) or ${file:PATH}"
    ]


def test_invalid_value_from_a_variable_is_not_echoed(problems_of: Problems) -> None:
    assert problems_of(UPSTREAM, {"RETRY_MAX_ATTEMPTS": "0"}) == [
        "config/proxy.yaml:11: routes[0].retry.max_attempts: must be >= 1, "
        "got the value of ${RETRY_MAX_ATTEMPTS}"
    ]
    lines = problems_of(UPSTREAM, {"RETRY_INITIAL_DELAY": "soon-ish"})
    assert lines == [
        "config/proxy.yaml:13: routes[0].retry.backoff.initial: not a duration: the value of "
        "${RETRY_INITIAL_DELAY} (use 250ms, 2s, 5m, 1h; a bare number is seconds)"
    ]


def test_partial_expansion_inside_a_value(load_yaml: Load) -> None:
    text = "upstreams:\n  a:\n    url: https://${API_HOST:-api.example.com}:${API_PORT:-443}/v1/\n"
    upstream = load_yaml(text, {"API_HOST": "staging.example.com"}).upstreams["a"]
    assert upstream.url == "https://staging.example.com:443/v1"
    assert upstream.host == "staging.example.com:443"


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "7")
    config = load_config_text(UPSTREAM)
    assert config.routes[0].retry is not None
    assert config.routes[0].retry.max_attempts == 7


def test_default_config_path() -> None:
    assert default_config_path({}) == "config/proxy.yaml"
    assert default_config_path({"RESILIENCE_PROXY_CONFIG": ""}) == "config/proxy.yaml"
    assert default_config_path({"RESILIENCE_PROXY_CONFIG": "/etc/rp.yaml"}) == "/etc/rp.yaml"


def test_an_unset_variable_is_reported_once(problems_of: Problems) -> None:
    text = "upstreams:\n  a: {url: http://a}\nroutes:\n  - {name: r, upstream: a, retry: {max_attempts: '${N}'}}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:4: routes[0].retry.max_attempts: environment variable N is not set "
        "(write ${N:-} to make it optional, or ${N:-DEFAULT})"
    ]

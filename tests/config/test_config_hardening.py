"""Hostile or careless config files: every one is a problem line, never a crash or a freeze.

Issue 12 items 1-5 and issue 13 item 8 (`${file:PATH}`): the caps on what a file may
expand to, input the YAML library cannot read, a config with no routes, problems of one
block reported together, warnings, UTF-8 header values, and mounted-Secret files.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import ConfigInvalid, load_config
from proxy.config.loader import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

Problems = Callable[..., list[str]]
Load = Callable[..., object]

VALID = """\
version: 1
upstreams:
  api: {url: "https://api.example.com"}
routes:
  - name: api
    match: {path_prefix: /api/}
    upstream: api
"""


def file_problems(tmp_path: Path, text: str | bytes, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "proxy.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigInvalid) as caught:
        load_config(str(path), env=env or {})
    return [str(p).replace(str(path), "FILE") for p in caught.value.problems]


def alias_bomb(levels: int, width: int = 10) -> str:
    lines = ['a0: &a0 ["x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "x-bomb:\n" + "".join(f"  {line}\n" for line in lines)


# --- item 1: the alias bomb and the caps ------------------------------------------------


def test_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    tracemalloc.start()
    began = time.perf_counter()
    try:
        lines = file_problems(tmp_path, alias_bomb(9) + VALID)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - began < 2.0  # today: > 20 s and 1.4 GB
    assert peak < 32 * 1024 * 1024
    assert lines == [f"FILE:7: expands to more than {MAX_NODES} values through YAML aliases"]


def test_aliases_within_the_caps_still_work(load_yaml: Load) -> None:
    text = VALID + "    retry: &r {max_attempts: 2}\n"
    text += "  - {name: b, match: {path_prefix: /b/}, upstream: api, retry: *r}\n"
    config = load_yaml(text)
    assert [r.retry.max_attempts for r in config.routes] == [2, 2]  # type: ignore[attr-defined]


def test_each_cap_is_a_problem_line(tmp_path: Path) -> None:
    deep = "x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"
    assert file_problems(tmp_path, deep + VALID) == [f"FILE:1: nested more than {MAX_DEPTH} levels deep"]
    wide = "x: [" + ", ".join(["1"] * (MAX_NODES + 1)) + "]\n"
    assert file_problems(tmp_path, wide + VALID) == [f"FILE:1: more than {MAX_NODES} values"]
    aliases = "a: &a 1\nb: [" + ", ".join(["*a"] * 1001) + "]\n"
    assert file_problems(tmp_path, aliases + VALID) == ["FILE:2: more than 1000 YAML aliases (*name)"]
    long_value = VALID.replace("https://api.example.com", "https://api.example.com/" + "a" * 70000)
    assert file_problems(tmp_path, long_value) == ["FILE:3: a value longer than 64 KiB characters"]
    huge = "# padding\n" * (MAX_FILE_BYTES // 10 + 1) + VALID
    assert file_problems(tmp_path, huge) == ["FILE: larger than 256 KiB: not a config file"]


def test_deep_nesting_through_aliases_is_capped(tmp_path: Path) -> None:
    # Each anchor is 40 levels deep and holds the previous one: 200 levels once expanded.
    lines = ["x:"]
    for i in range(5):
        inner = f"*n{i - 1}" if i else "1"
        lines.append(f"  n{i}: &n{i} " + "[" * 40 + inner + "]" * 40)
    problems = file_problems(tmp_path, "\n".join(lines) + "\n" + VALID)
    assert problems == [f"FILE:3: nested more than {MAX_DEPTH} levels deep through YAML aliases"]


def test_a_recursive_alias_is_a_problem(tmp_path: Path) -> None:
    assert file_problems(tmp_path, "x: &a [*a]\n" + VALID) == [
        "FILE:1: a recursive YAML alias is not supported"
    ]


def test_lines_inside_an_aliased_block_point_at_the_anchor(problems_of: Problems) -> None:
    text = """\
upstreams:
  api: {url: "https://api.example.com"}
policies:
  base: &base
    retry:
      max_attempts: 0
  copy: *base
routes:
  - {name: r, upstream: api, policy: copy}
"""
    assert problems_of(text) == [
        "config/proxy.yaml:6: policies.base.retry.max_attempts: must be >= 1, got 0",
        "config/proxy.yaml:6: policies.copy.retry.max_attempts: must be >= 1, got 0",
    ]


# --- item 2: crashes that become problems -----------------------------------------------


def test_nul_byte_is_a_problem_with_its_line(tmp_path: Path) -> None:
    assert file_problems(tmp_path, VALID.replace("routes:", "routes:\0")) == [
        "FILE:4: contains the control character U+0000, which YAML does not allow (only tab, CR and LF)"
    ]


def test_nesting_500_deep_is_a_problem(tmp_path: Path) -> None:
    for opener, closer in (("[", "]"), ("{a: ", "}")):
        text = "x: " + opener * 600 + "1" + closer * 600 + "\n" + VALID
        assert file_problems(tmp_path, text) == [f"FILE:1: nested more than {MAX_DEPTH} levels deep"]
    block = "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 300)) + VALID
    assert file_problems(tmp_path, block)[0].endswith(f"nested more than {MAX_DEPTH} levels deep")


def test_a_5000_digit_integer_is_a_problem_at_its_key(tmp_path: Path) -> None:
    text = VALID + "    retry: {max_attempts: " + "9" * 5000 + "}\n"
    assert file_problems(tmp_path, text) == [
        "FILE:8: routes[0].retry.max_attempts: an integer with too many digits (at most 4300)"
    ]


def test_an_impossible_date_and_an_unknown_tag_are_problems(tmp_path: Path) -> None:
    text = VALID + "    strip_prefix: 2024-13-45\n    policy: !secret x\n"
    assert file_problems(tmp_path, text) == [
        "FILE:8: routes[0].strip_prefix: not a valid date or time; quote it to make it a string",
        "FILE:9: routes[0].policy: unsupported YAML tag !secret",
    ]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_token_file_on_a_device_is_refused_without_reading_it(tmp_path: Path, device: str) -> None:
    text = VALID + f"admin: {{token_file: {device}}}\n"
    assert file_problems(tmp_path, text) == [
        f"FILE:8: admin.token_file: cannot read '{device}': not a regular file"
    ]


def test_a_huge_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tok").write_bytes(b"a" * (65 * 1024))
    assert file_problems(tmp_path, VALID + "admin: {token_file: tok}\n") == [
        f"FILE:8: admin.token_file: cannot read '{tmp_path / 'tok'}': larger than 64 KiB"
    ]


# --- item 4: no routes, version 1 -------------------------------------------------------


@pytest.mark.parametrize("text", ["", "~\n", "# only a comment\n", "version: 1\nroutes: []\n"])
def test_a_config_without_routes_is_refused(tmp_path: Path, text: str) -> None:
    line = "2" if "routes" in text else "1"
    assert file_problems(tmp_path, text) == [
        f"FILE:{line}: routes: no routes: every request would be answered 404; add at least one route"
    ]


@pytest.mark.parametrize("value", ["true", "'1'", "1.0", "[1]"])
def test_version_must_be_the_integer_1(tmp_path: Path, value: str) -> None:
    shown = {"true": "true", "'1'": "'1'", "1.0": "1.0", "[1]": "a list"}[value]
    problems = file_problems(tmp_path, VALID.replace("version: 1", f"version: {value}"))
    assert problems == [f"FILE:1: version: must be the integer 1, got {shown}"]


def test_version_from_a_variable_and_absent_version_still_load(load_yaml: Load) -> None:
    assert load_yaml(VALID.replace("version: 1", "version: ${V:-1}"))
    assert load_yaml(VALID.replace("version: 1\n", ""))


# --- item 5: one pass, warnings, header values ------------------------------------------


def test_one_block_reports_every_problem_at_once(problems_of: Problems) -> None:
    text = VALID + "    breaker:\n      failure_rate: {threshold: 150%, window: 30s, window_calls: 100}\n"
    assert problems_of(text) == [
        "config/proxy.yaml:9: routes[0].breaker.failure_rate: set window or window_calls, not both",
        "config/proxy.yaml:9: routes[0].breaker.failure_rate.threshold: must be between 0% and 100%, got '150%'",
    ]


def test_remote_listen_with_credentials_is_reported_with_other_errors(problems_of: Problems) -> None:
    text = VALID.replace("version: 1", "version: 1\nlisten: 0.0.0.0:8080").replace(
        '{url: "https://api.example.com"}',
        '{url: "https://api.example.com", headers: {Authorization: "Bearer x"}}',
    ) + "    retry: {max_attempts: 0}\n"
    lines = problems_of(text)
    assert lines[0].startswith("config/proxy.yaml:2: listen: a non-loopback address while upstream(s) api")
    assert lines[1] == "config/proxy.yaml:9: routes[0].retry.max_attempts: must be >= 1, got 0"
    assert len(lines) == 2


SHADOWED = """\
version: 1
upstreams:
  api: {url: "https://api.example.com"}
routes:
  - {name: all-api, match: {path_prefix: /api}, upstream: api}
  - {name: api-v2, match: {path_prefix: /api/v2/, methods: [GET]}, upstream: api}
  - {name: other, match: {path_prefix: /apix/}, upstream: api}
  - {name: hosted, match: {path_prefix: /h/, host: a.example.com}, upstream: api}
  - {name: hosted-port, match: {path_prefix: /h/x/, host: "a.example.com:8443"}, upstream: api}
  - {name: other-host, match: {path_prefix: /h/x/, host: b.example.com}, upstream: api}
  - {name: dots, match: {path_prefix: /../}, upstream: api}
  - {name: encoded-dots, match: {path_prefix: /a/%2E/}, upstream: api}
"""


def test_unreachable_routes_are_warnings_not_errors(load_yaml: Load) -> None:
    config = load_yaml(SHADOWED)
    assert [str(w) for w in config.warnings] == [  # type: ignore[attr-defined]
        "config/proxy.yaml:6: routes[1]: warning: never matches: routes[0] (all-api) comes first "
        "and matches every request this route would (first match wins); move this route above "
        "it or narrow its match",
        "config/proxy.yaml:9: routes[4]: warning: never matches: routes[3] (hosted) comes first "
        "and matches every request this route would (first match wins); move this route above "
        "it or narrow its match",
        "config/proxy.yaml:11: routes[6].match.path_prefix: warning: contains a dot-segment "
        "(. or ..): requests with one are refused with 400, so this route never matches",
        "config/proxy.yaml:12: routes[7].match.path_prefix: warning: contains a dot-segment "
        "(. or ..): requests with one are refused with 400, so this route never matches",
    ]


def test_a_narrower_earlier_route_shadows_no_broader_one(load_yaml: Load) -> None:
    text = VALID + "  - {name: all, match: {path_prefix: /}, upstream: api}\n"
    text += "  - {name: posts, match: {path_prefix: /api/, methods: [POST]}, upstream: api}\n"
    config = load_yaml(text)
    assert [str(w) for w in config.warnings] == [  # type: ignore[attr-defined]
        "config/proxy.yaml:9: routes[2]: warning: never matches: routes[0] (api) comes first and "
        "matches every request this route would (first match wins); move this route above it "
        "or narrow its match"
    ]


def test_control_characters_in_injected_headers_are_errors(problems_of: Problems) -> None:
    for char in ("\\x01", "\\x7f", "\\x85"):
        text = VALID.replace('{url: "https://api.example.com"}', f'{{url: "https://api.example.com", headers: {{X-Key: "a{char}b"}}}}')
        assert problems_of(text) == [
            'config/proxy.yaml:3: upstreams.api.headers.X-Key: a header value must not contain control characters'
        ]


def test_non_ascii_header_values_are_compiled_to_their_utf8_bytes(load_yaml: Load) -> None:
    text = VALID.replace('{url: "https://api.example.com"}', '{url: "https://api.example.com", headers: {X-Note: "5 € für Zoë"}}')
    config = load_yaml(text)
    value = dict(config.upstreams["api"].headers)["x-note"]  # type: ignore[attr-defined]
    assert value.encode("latin-1") == "5 € für Zoë".encode()


# --- issue 13 item 8: ${file:PATH} ------------------------------------------------------


def test_file_reference_takes_the_trimmed_content_as_a_secret(tmp_path: Path) -> None:
    (tmp_path / "hf").write_text("  hf_secret_token_123\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(
        VALID.replace(
            '{url: "https://api.example.com"}',
            '{url: "https://api.example.com", headers: {Authorization: "Bearer ${file:hf}"}}',
        )
    )
    config = load_config(str(path), env={})
    assert dict(config.upstreams["api"].headers)["authorization"] == "Bearer hf_secret_token_123"
    assert "hf_secret_token_123" in config.secrets
    assert "hf_secret_token_123" not in json.dumps(config.redacted)
    assert config.watched_files == (str(tmp_path / "hf"),)


def test_file_reference_in_a_plain_setting_is_redacted_in_config_view(tmp_path: Path) -> None:
    (tmp_path / "n").write_text("4\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(VALID + "    retry: {max_attempts: '${file:n}'}\n")
    config = load_config(str(path), env={})
    assert config.routes[0].retry is not None and config.routes[0].retry.max_attempts == 4
    assert config.redacted["routes"][0]["retry"]["max_attempts"] == "<redacted>"  # type: ignore[index]


def test_a_missing_or_unreadable_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    text = VALID.replace(
        '{url: "https://api.example.com"}',
        '{url: "https://api.example.com", headers: {A: "${file:missing}", B: "${file:dir}", C: "${file:/dev/zero}"}}',
    )
    assert file_problems(tmp_path, text) == [
        f"FILE:3: upstreams.api.headers.A: cannot read ${{file:missing}} ({tmp_path / 'missing'}): No such file or directory",
        f"FILE:3: upstreams.api.headers.B: cannot read ${{file:dir}} ({tmp_path / 'dir'}): not a regular file",
        "FILE:3: upstreams.api.headers.C: cannot read ${file:/dev/zero} (/dev/zero): not a regular file",
    ]


def test_a_file_with_a_line_break_inside_is_refused_unquoted(tmp_path: Path) -> None:
    (tmp_path / "two").write_text("line1\nline2\n")
    text = VALID.replace('{url: "https://api.example.com"}', '{url: "https://api.example.com", headers: {A: "${file:two}"}}')
    assert file_problems(tmp_path, text) == [
        "FILE:3: upstreams.api.headers.A: contains a control character (CR, LF or NUL) after expanding ${file:two}"
    ]


def test_a_changed_file_changes_the_config_hash(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("one-token\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(VALID.replace('{url: "https://api.example.com"}', '{url: "https://api.example.com", headers: {A: "${file:tok}"}}'))
    first = load_config(str(path), env={}).hash
    (tmp_path / "tok").write_text("two-token\n")
    assert load_config(str(path), env={}).hash != first


def test_rules_between_keys_are_reported_with_invalid_values(problems_of: Problems) -> None:
    # Today the cross-key rules (compile time) only show once every value is valid.
    text = """\
upstreams:
  api: {url: "https://api.example.com"}
  private: {url: "https://p.example.com", tls: {ca_file: /nonexistent/ca.pem}}
routes:
  - name: a
    upstream: api
    retry: {max_attempts: 0}
  - name: b
    upstream: api
    breaker: {open_for: 10m, open_for_max: 1m}
cache: {max_bytes: 1MiB, max_entry_bytes: 2MiB}
"""
    assert problems_of(text) == [
        "config/proxy.yaml:3: upstreams.private.tls.ca_file: no readable file at '/nonexistent/ca.pem'",
        "config/proxy.yaml:7: routes[0].retry.max_attempts: must be >= 1, got 0",
        "config/proxy.yaml:10: routes[1].breaker.open_for_max: must be >= open_for (10m), got 1m",
        "config/proxy.yaml:11: cache.max_entry_bytes: must be <= cache.max_bytes (1MiB), got 2MiB",
    ]


def test_a_rule_next_to_an_invalid_value_is_not_guessed_from_a_default(problems_of: Problems) -> None:
    # open_for is invalid: comparing open_for_max with the default 60s would mislead.
    text = VALID + "    breaker: {open_for: soon, open_for_max: 30s}\n"
    lines = problems_of(text)
    assert len(lines) == 1 and lines[0].startswith("config/proxy.yaml:8: routes[0].breaker.open_for:")
    # The same through a policy the route merges: nothing guessed for the route either.
    text = """\
upstreams:
  api: {url: "https://api.example.com"}
policies:
  p:
    breaker: {open_for: soon}
routes:
  - {name: a, upstream: api, policy: p, breaker: {open_for_max: 30s}}
"""
    lines = problems_of(text)
    assert len(lines) == 1 and lines[0].startswith("config/proxy.yaml:5: policies.p.breaker.open_for:")

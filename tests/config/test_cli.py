"""The command line as an operator uses it (DESIGN §3)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else {"PATH": "/usr/bin:/bin"},
    )


BAD = """\
version: 1
listen: 127.0.0.1:18999
upstreams:
  api: {url: "https://api.example.com"}
routes:
  - name: api
    match: {path_prefix: /api/}
    upstream: api
    retry:
      max_attempts: 0
      backoff: {initial: 5x}
    colour: blue
  - name: other
    match: {path_prefix: /other/}
    upstream: nowhere
"""


def test_check_prints_every_problem_with_file_line_and_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = cli("check", "--config", str(path))
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert f"{path}:10: routes[0].retry.max_attempts: must be >= 1, got 0" in lines
    assert any(line.startswith(f"{path}:11: routes[0].retry.backoff.initial:") for line in lines)
    assert any(line.startswith(f"{path}:12: routes[0].colour:") for line in lines)
    assert any(line.startswith(f"{path}:15: routes[1].upstream: unknown upstream") for line in lines)


def test_check_accepts_the_shipped_config_without_any_environment() -> None:
    result = cli("check", "--config", "config/proxy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_run_with_an_invalid_config_exits_2_without_listening(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    result = cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "routes[0].retry.max_attempts" in result.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 18999)) != 0


def test_schema_and_version() -> None:
    schema = json.loads(cli("schema").stdout)
    assert schema["type"] == "object" and "routes" in schema["properties"]
    assert cli("version").stdout.strip()[0].isdigit()


def test_default_config_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BAD)
    result = cli("check", env={"PATH": "/usr/bin:/bin", "RESILIENCE_PROXY_CONFIG": str(path)})
    assert result.returncode == 2 and str(path) in result.stdout

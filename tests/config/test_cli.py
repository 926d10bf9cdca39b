"""The command line as an operator uses it (DESIGN §3)."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


EXPOSED = """\
version: 1
listen: 0.0.0.0:{port}
allow_remote_clients: true
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  api:
    url: https://api.example.com
    headers: {{Authorization: "Bearer ${{API_TOKEN:-}}"}}
  open: {{url: "https://open.example.com"}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: api}}
  - {{name: open, match: {{path_prefix: /open/}}, upstream: open}}
"""


def test_exposed_credentials_names_injecting_upstreams_off_loopback_only() -> None:
    from proxy.cli import exposed_credentials
    from proxy.config import load_config_text

    text = EXPOSED.format(port=8080, admin=9901)
    assert exposed_credentials(load_config_text(text, env={"API_TOKEN": "t0ken"})) == ["api"]
    # No token set: nothing is injected, nothing exposed.
    assert exposed_credentials(load_config_text(text, env={})) == []
    loopback = text.replace("0.0.0.0:8080", "127.0.0.1:8080")
    assert exposed_credentials(load_config_text(loopback, env={"API_TOKEN": "t0ken"})) == []


def test_a_remote_listener_that_injects_credentials_warns_at_start(tmp_path: Path) -> None:
    # The port is taken on 127.0.0.1, so the wildcard bind fails after the start-up checks:
    # the warning is logged, and nothing ever listens off loopback during the test.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        admin = free.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "API_TOKEN": "secret-token-value", "XDG_STATE_HOME": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "exposed.yaml"
        path.write_text(EXPOSED.format(port=port, admin=admin))
        result = cli("run", "--config", str(path), env=env)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if line["event"] == "remote_clients_allowed"]
    assert warning["level"] == "warning"
    assert warning["listen"] == f"0.0.0.0:{port}"
    assert warning["upstreams"] == ["api"]
    assert "secret-token-value" not in result.stderr
    assert any(line["event"] == "listen_failed" for line in lines)


# --- issue 12: hostile files, warnings, a closed pipe -------------------------------------


def measured_cli(*args: str) -> tuple[int, str, str, float, int]:
    """Run the CLI; (exit status, stdout, stderr, seconds, peak RSS in bytes).

    The RSS is the largest of any child this test process has waited for, an upper bound.
    """
    began = time.perf_counter()
    result = cli(*args)
    seconds = time.perf_counter() - began
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return result.returncode, result.stdout, result.stderr, seconds, rss


HOSTILE = {
    "alias-bomb": "x:\n  a0: &a0 [x]\n"
    + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)),
    "nul": "version: 1\0\n",
    "deep": "x: " + "[" * 600 + "]" * 600 + "\n",
    "digits": "version: " + "9" * 5000 + "\n",
    "dev-zero": "",  # the shipped admin.token replaced, below
    "empty": "",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_check_answers_every_hostile_file_with_problem_lines(tmp_path: Path, name: str) -> None:
    shipped = (ROOT / "config" / "proxy.yaml").read_text()
    path = tmp_path / "proxy.yaml"
    if name == "dev-zero":
        shipped = shipped.replace("  token: ${RESILIENCE_PROXY_ADMIN_TOKEN:-}", "  token_file: /dev/zero")
    text = HOSTILE[name] + shipped.replace("version: 1\n", "")
    path.write_text("" if name == "empty" else text)
    status, out, err, seconds, rss = measured_cli("check", "--config", str(path))
    assert status == 2, out + err
    assert "Traceback" not in out + err
    assert out and all(line.startswith(str(path)) for line in out.splitlines()), out
    assert seconds < 5 and rss < 256 * 1024 * 1024, (seconds, rss)


def test_check_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "upstreams: {a: {url: 'https://a.example.com'}}\n"
        "routes:\n"
        "  - {name: all, upstream: a}\n"
        "  - {name: late, match: {path_prefix: /late/}, upstream: a}\n"
    )
    result = cli("check", "--config", str(path))
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"{path}:4: routes[1]: warning: never matches: routes[0] (all) comes first and matches "
        "every request this route would (first match wins); move this route above it or narrow "
        "its match",
        f"{path}: ok (2 routes, 1 upstreams)",
    ]


@pytest.mark.parametrize("args", [("schema",), ("check", "--config", "MANY")])
def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path, args: tuple[str, ...]) -> None:
    many = tmp_path / "many.yaml"
    many.write_text("routes:\n" + "".join(f"  - {{name: r{i}, upstream: nope}}\n" for i in range(3000)))
    argv = [a.replace("MANY", str(many)) for a in args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -1`: read a line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    status = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert status == (2 if args[0] == "check" else 0)

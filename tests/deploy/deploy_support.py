"""Helpers shared by the packaging and deployment checks (DESIGN §9, §11).

`running_proxy` starts the real proxy (`python -m proxy run`) on free loopback ports, the
way a container would, so that the dashboard, the alert rules and the image's HEALTHCHECK
are checked against what the proxy actually serves rather than against each other.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# DESIGN §9, the public metric names (without the `resilience_proxy_` prefix) and types.
# Counters are spelled with `_total` as in the spec; histograms expose _bucket/_sum/_count.
DESIGN_METRICS: dict[str, str] = {
    "requests_total": "counter",
    "request_duration_seconds": "histogram",
    "upstream_attempts_total": "counter",
    "upstream_attempt_duration_seconds": "histogram",
    "retries_total": "counter",
    "retry_calls_total": "counter",
    "retry_budget_exhausted_total": "counter",
    "breaker_state": "gauge",
    "breaker_opened_timestamp_seconds": "gauge",
    "breaker_transitions_total": "counter",
    "breaker_rejected_total": "counter",
    "bulkhead_in_flight": "gauge",
    "bulkhead_queued": "gauge",
    "bulkhead_rejected_total": "counter",
    "fallbacks_total": "counter",
    "failovers_total": "counter",
    "rate_limited_total": "counter",
    "upstream_quota_remaining": "gauge",
    "upstream_quota_reset_seconds": "gauge",
    "cache_entries": "gauge",
    "cache_bytes": "gauge",
    "cache_evictions_total": "counter",
    "config_reloads_total": "counter",
    "config_info": "gauge",
    "config_last_reload_success": "gauge",
    "config_last_reload_timestamp_seconds": "gauge",
    "upstream_credentials_present": "gauge",
    "build_info": "gauge",
    "state_backend_up": "gauge",
    "pg_up": "gauge",
    "pg_status": "gauge",
    "pg_pool_connections": "gauge",
    "pg_pool_size": "gauge",
    "pg_pool_max_size": "gauge",
    "pg_server_connections": "gauge",
    "pg_server_utilization_ratio": "gauge",
    "pg_server_utilization": "gauge",
    "pg_agent_pool_size": "gauge",
    "pg_agent_pool_used": "gauge",
    "pg_agent_pool_idle": "gauge",
    "pg_probe_duration_seconds": "histogram",
    "pg_probe_failures_total": "counter",
    "pg_consecutive_failures": "gauge",
}
PREFIX = "resilience_proxy_"
# Exported for one more release under the old name; dashboards and alerts must not use it.
DEPRECATED_METRICS = {"pg_server_utilization": "pg_server_utilization_ratio"}
# Exported only where configured: the fleet state backend (`state: {backend: redis}`).
CONDITIONAL_METRICS = {"state_backend_up"}


def design_series_names() -> dict[str, str]:
    """Every series name a query may use → the DESIGN §9 metric it belongs to."""
    names: dict[str, str] = {}
    for name, kind in DESIGN_METRICS.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[PREFIX + name + suffix] = name
        else:
            names[PREFIX + name] = name
    return names


def family_name(metric: str) -> str:
    """The exposition family name of a DESIGN §9 metric: counters drop `_total`, as the
    Prometheus text format's `# TYPE` line (and prometheus_client's parser) spell them."""
    full = PREFIX + metric
    if DESIGN_METRICS[metric] == "counter":
        return full.removesuffix("_total")
    return full


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")


@dataclass
class RunningProxy:
    process: subprocess.Popen[bytes]
    listen_port: int
    admin_port: int
    stderr_path: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")


def minimal_config(listen_port: int, admin_port: int, quiet: str, drain: str) -> str:
    """The smallest config the proxy serves: one upstream (nothing listens on port 9)
    and one route, on free loopback ports."""
    return f"""\
version: 1
listen: 127.0.0.1:{listen_port}
admin: {{listen: 127.0.0.1:{admin_port}}}
shutdown: {{quiet_period: {quiet}, drain_timeout: {drain}}}
state_file: ${{RESILIENCE_PROXY_STATE:-}}
upstreams:
  u: {{url: "http://127.0.0.1:9"}}
routes:
  - {{name: r, match: {{path_prefix: /r/}}, upstream: u}}
"""


def start_proxy(tmp: Path, quiet: str = "200ms", drain: str = "2s") -> RunningProxy:
    """Start `python -m proxy run` and wait until /healthz answers 200 (at most 20 s)."""
    listen_port, admin_port = free_port(), free_port()
    config = tmp / "proxy.yaml"
    config.write_text(minimal_config(listen_port, admin_port, quiet, drain), "utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_PROXY_")}
    env["RESILIENCE_PROXY_STATE"] = str(tmp / "state.json")
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state")
    stderr_path = tmp / "proxy.stderr"
    with (tmp / "proxy.stdout").open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    proxy = RunningProxy(process, listen_port, admin_port, stderr_path)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"the proxy exited with {process.returncode} before /healthz answered:\n"
                + proxy.stderr()[-4000:]
            )
        try:
            status, _ = http_get(proxy.admin + "/healthz", timeout=1.0)
            if status == 200:
                return proxy
        except OSError:
            pass
        time.sleep(0.1)
    stop_proxy(proxy)
    raise AssertionError("the proxy's /healthz did not answer 200 within 20 s:\n" + proxy.stderr())


def stop_proxy(proxy: RunningProxy, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if the drain overruns; returns the exit code."""
    if proxy.process.poll() is None:
        proxy.process.send_signal(signal.SIGTERM)
        try:
            proxy.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait()
    return proxy.process.returncode


def require_tool(name: str) -> str:
    """The tool's path; a loud skip when it is missing on a developer machine, a failure
    under CI=true (where .ci/sysdeps installs it)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make sysdeps installs it); this check did NOT run"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def parse_duration(value: object) -> float:
    """Seconds from a DESIGN §4 duration: `250ms`, `2s`, `5m`, `1h`, or a bare number."""
    text = str(value).strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    return float(text)


# --- Dockerfile and .dockerignore, as Docker reads them ----------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; `stage` counts FROMs."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match as Docker uses it: `*`, `?` and `[...]` stay within one path
    segment; `**` spans any number of segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent
    directories decides; `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

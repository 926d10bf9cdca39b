"""Reproducible performance comparison: resilience-proxy vs nginx vs aiohttp (one command).

    .venv/bin/python bench/run.py                 # ~10 s × 3 repeats × every target
    .venv/bin/python bench/run.py --quick         # 3 s × 1, a smoke run
    .venv/bin/python bench/run.py --cache-fill    # peak RSS after filling the 64 MiB cache

Method (bench/README.md has the long form):
- A fixed-response nginx upstream (one worker) and wrk share core 1; every process under
  test (nginx as a reverse proxy, resilience-proxy, the aiohttp references) runs on core 0.
- Targets are interleaved across repetitions (A B C … A B C …) so drift hits all alike;
  each figure is the median over the repetitions.
- CPU per request = Δ(utime + stime) of the process tree under test, read from
  /proc/PID/stat before and after one wrk run, ÷ the requests wrk completed; in µs.

Every server started here is stopped at the end (its process group is killed), everything
listens on 127.0.0.1 only, and every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TEMPLATES = BENCH_DIR / "templates"
RESULTS = BENCH_DIR / "results"
PYTHON = sys.executable

CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat time unit: ticks per second
ADMIN_TOKEN = "bench-admin-token"
BODY = '{"data": "' + "x" * 1000 + '"}'  # ~1 KiB, returned by the upstream for any path
BLOB_BYTES = 256 * 1024  # --cache-fill entry size
CACHE_BUDGET = 64 * 1024 * 1024  # cache.max_bytes in the cache-fill config
RSS_BASE_BUDGET = 64 * 1024 * 1024  # the proxy's own budget beside the cache (issue 5)
MiB = 1024 * 1024


# -- pure helpers (unit-tested in tests/bench/test_bench_harness.py) ------------------------


class BenchTemplate(string.Template):
    """`@{name}` placeholders: neither nginx (`$var`, `{}`) nor YAML (`${VAR}`) use `@{`."""

    delimiter = "@"


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill every `@{name}`; a missing value is a KeyError, never a silent blank."""
    return BenchTemplate(template).substitute({k: str(v) for k, v in values.items()})


_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk_time(text: str) -> float:
    """wrk's `1.23ms`, `850.00us`, `1.01s` → milliseconds."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run reports: throughput, latency percentiles (ms) and failures."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx_3xx: int
    socket_errors: int


def parse_wrk(output: str) -> WrkResult:
    """Parse `wrk --latency` output; raises ValueError when a figure is missing."""
    done = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h)", output, re.M)
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", output, re.M)
    if done is None or rps is None:
        raise ValueError("wrk output has no request count or Requests/sec line")
    percentiles: dict[str, float] = {}
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", output, re.M)
        if match is None:
            raise ValueError(f"wrk output has no {pct}% latency (was --latency given?)")
        percentiles[pct] = parse_wrk_time(match.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests=int(done.group(1)),
        seconds=parse_wrk_time(done.group(2) + done.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=percentiles["50"],
        p75_ms=percentiles["75"],
        p90_ms=percentiles["90"],
        p99_ms=percentiles["99"],
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


def parse_stat_ticks(stat: str) -> int:
    """utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks.

    The command name (field 2) may hold spaces and parentheses, so split after the last `)`.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # rest[0] is field 3 (state)


def parse_stat_ppid(stat: str) -> int:
    """The parent pid (field 4 of /proc/PID/stat)."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def parse_status_kib(status: str, key: str) -> int | None:
    """A `Key:   123 kB` line of /proc/PID/status (VmHWM, VmRSS) → KiB."""
    match = re.search(rf"^{key}:\s*(\d+)\s*kB", status, re.M)
    return int(match.group(1)) if match else None


def parse_core_busy(proc_stat: str, core: int) -> int:
    """Busy ticks of one CPU from /proc/stat: every column but idle (4th) and iowait (5th)."""
    match = re.search(rf"^cpu{core}\s+([\d\s]+)$", proc_stat, re.M)
    if match is None:
        raise ValueError(f"/proc/stat has no cpu{core} line")
    ticks = [int(v) for v in match.group(1).split()]
    return sum(ticks[:3]) + sum(ticks[5:8])  # user nice system | irq softirq steal


def cpu_us_per_request(ticks: int, requests: int, tick_hz: int = CLK_TCK) -> float:
    """CPU microseconds per request: ticks / tick_hz seconds, × 1e6, ÷ requests."""
    if requests <= 0:
        return float("nan")
    return ticks * 1_000_000 / tick_hz / requests


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def no_nan(value: Any) -> Any:
    """A copy of a JSON-able tree with NaN floats as null (strict JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def ratio(value: float, reference: float) -> float:
    """value / reference, NaN when either is missing or the reference is 0."""
    if reference != reference or value != value or reference == 0:
        return float("nan")
    return value / reference


# -- processes -------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process exited between listing and reading
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (nginx master + worker), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is not None:
            children.setdefault(parse_stat_ppid(stat), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_ticks(root: int) -> int:
    """utime + stime summed over the process tree rooted at `root` (all threads included)."""
    total = 0
    for pid in process_tree(root):
        stat = _read(f"/proc/{pid}/stat")
        if stat is not None:
            total += parse_stat_ticks(stat)
    return total


def memory_kib(pid: int) -> dict[str, int | None]:
    status = _read(f"/proc/{pid}/status") or ""
    return {"VmHWM": parse_status_kib(status, "VmHWM"), "VmRSS": parse_status_kib(status, "VmRSS")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every server this run starts, each in its own session; `stop_all` kills the groups."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Started] = []

    def start(self, name: str, cmd: Sequence[str], core: int | None) -> Started:
        pinned = ["taskset", "-c", str(core), *cmd] if core is not None else list(cmd)
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                pinned,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        item = Started(name, proc, log)
        self.started.append(item)
        return item

    def stop_all(self) -> None:
        for item in reversed(self.started):
            _stop(item)
        self.started.clear()


def _stop(item: Started, grace: float = 5.0) -> None:
    if item.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(item.proc.pid, signal.SIGTERM)
        try:
            item.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (nginx workers, stragglers) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(item.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        item.proc.wait(grace)


# -- HTTP ------------------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


def http(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One request with the stdlib (no env proxies); HTTP errors are replies, not raises."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers.items()), exc.read())


def wait_ready(item: Started, url: str, timeout: float = 20.0) -> None:
    """Poll `url` until it answers (any status); fail early if the process exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if item.proc.poll() is not None:
            raise RuntimeError(f"{item.name} exited with {item.proc.returncode}:\n{item.tail()}")
        try:
            http("GET", url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise RuntimeError(f"{item.name} not ready at {url} after {timeout:.0f}s:\n{item.tail()}")


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    label: str
    url: str
    under_test: Started | None  # whose CPU is counted (None: direct to the upstream)
    expect_status: int = 200
    expect_reason: str | None = None  # X-Resilience-Reason on proxy-produced answers
    uses_upstream: bool = True


@dataclass(slots=True)
class Run:
    target: str
    repeat: int
    wrk: WrkResult
    cpu_us_per_req: float
    upstream_cpu_us_per_req: float
    # Share of the under-test core's time used by anything else during the run (other
    # sessions on a shared machine): a noise indicator, in percent.
    core_other_pct: float = float("nan")


@dataclass(slots=True)
class Summary:
    target: str
    label: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    upstream_cpu_us_per_req: float
    cpu_x_nginx: float = float("nan")
    rps_x_nginx: float = float("nan")
    p50_x_nginx: float = float("nan")
    p99_x_nginx: float = float("nan")
    unexpected_responses: int = 0
    repeats: int = 0
    core_other_pct: float = float("nan")  # median noise on the under-test core


def run_wrk(url: str, duration: int, connections: int, core: int | None) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s", url]
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def measure(
    target: Target,
    upstream: Started,
    duration: int,
    connections: int,
    wrk_core: int | None,
    target_core: int | None,
    repeat: int,
) -> Run:
    """One wrk run against `target`, with CPU ticks of the process under test around it."""
    subject = target.under_test
    before = tree_ticks(subject.pid) if subject else 0
    up_before = tree_ticks(upstream.pid)
    core_before = parse_core_busy(_read("/proc/stat") or "", target_core or 0)
    wall_before = time.monotonic()
    result = run_wrk(target.url, duration, connections, wrk_core)
    wall = time.monotonic() - wall_before
    core_busy = parse_core_busy(_read("/proc/stat") or "", target_core or 0) - core_before
    after = tree_ticks(subject.pid) if subject else 0
    up_after = tree_ticks(upstream.pid)
    other = core_busy - (after - before) if target_core is not None else float("nan")
    return Run(
        target=target.key,
        repeat=repeat,
        wrk=result,
        cpu_us_per_req=(
            cpu_us_per_request(after - before, result.requests) if subject else float("nan")
        ),
        upstream_cpu_us_per_req=cpu_us_per_request(up_after - up_before, result.requests),
        core_other_pct=max(0.0, other) * 100.0 / (wall * CLK_TCK),
    )


def summarize(targets: Sequence[Target], runs: Sequence[Run]) -> list[Summary]:
    """Median of each figure over repeats, then ratios to the nginx reverse-proxy row."""
    out: list[Summary] = []
    for target in targets:
        mine = [r for r in runs if r.target == target.key]
        if not mine:
            continue
        unexpected = sum(
            r.wrk.non_2xx_3xx if target.expect_status < 300 else 0 for r in mine
        ) + sum(r.wrk.socket_errors for r in mine)
        out.append(
            Summary(
                target=target.key,
                label=target.label,
                rps=median([r.wrk.rps for r in mine]),
                p50_ms=median([r.wrk.p50_ms for r in mine]),
                p99_ms=median([r.wrk.p99_ms for r in mine]),
                cpu_us_per_req=median([r.cpu_us_per_req for r in mine]),
                upstream_cpu_us_per_req=median([r.upstream_cpu_us_per_req for r in mine]),
                unexpected_responses=unexpected,
                repeats=len(mine),
                core_other_pct=median([r.core_other_pct for r in mine]),
            )
        )
    reference = next((s for s in out if s.target == "nginx"), None)
    if reference is not None:
        for s in out:
            s.cpu_x_nginx = ratio(s.cpu_us_per_req, reference.cpu_us_per_req)
            s.rps_x_nginx = ratio(s.rps, reference.rps)
            s.p50_x_nginx = ratio(s.p50_ms, reference.p50_ms)
            s.p99_x_nginx = ratio(s.p99_ms, reference.p99_ms)
    return out


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    goal: str
    ok: bool | None  # None: informational, or a figure is missing


def _pct(a: float, b: float) -> float:
    return (ratio(a, b) - 1.0) * 100.0


def checks(summaries: Sequence[Summary]) -> list[Check]:
    """The comparisons the issues ask for, from the medians."""
    by = {s.target: s for s in summaries}
    out: list[Check] = []

    def have(*keys: str) -> bool:
        return all(k in by and by[k].cpu_us_per_req == by[k].cpu_us_per_req for k in keys)

    if have("naive", "nginx"):
        out.append(
            Check(
                "naive aiohttp proxy CPU/req vs nginx",
                f"{by['naive'].cpu_x_nginx:.2f}×",
                "reference (issues quote ≈9×)",
                None,
            )
        )
    if have("plain", "nginx"):
        limit = by["naive"].cpu_x_nginx if have("naive") else 9.0
        value = by["plain"].cpu_x_nginx
        out.append(
            Check(
                "plain route CPU/req vs nginx",
                f"{value:.2f}×",
                f"≤ naive aiohttp proxy ({limit:.2f}×)",
                value <= limit,
            )
        )
    for key, budget in (
        ("retry", 10.0),
        ("guarded", None),
        ("fallback", 15.0),
        ("limited", None),
        ("shared", None),
    ):
        if have(key, "plain"):
            delta = _pct(by[key].cpu_us_per_req, by["plain"].cpu_us_per_req)
            rps = _pct(by[key].rps, by["plain"].rps)
            goal = f"≤ +{budget:.0f}%" if budget is not None else "informational"
            out.append(
                Check(
                    f"{key} route CPU/req vs plain",
                    f"{delta:+.1f}% (req/s {rps:+.1f}%)",
                    goal,
                    delta <= budget if budget is not None else None,
                )
            )
    for key in ("open", "full"):
        if have(key, "trivial"):
            value = ratio(by[key].cpu_us_per_req, by["trivial"].cpu_us_per_req)
            out.append(
                Check(
                    f"{key} rejection CPU/req vs trivial aiohttp handler",
                    f"{value:.2f}× ({by[key].cpu_us_per_req:.0f} µs vs "
                    f"{by['trivial'].cpu_us_per_req:.0f} µs)",
                    "informational",
                    None,
                )
            )
    if have("failover", "guarded"):
        delta = _pct(by["failover"].cpu_us_per_req, by["guarded"].cpu_us_per_req)
        rps = _pct(by["failover"].rps, by["guarded"].rps)
        out.append(
            Check(
                "failover route CPU/req vs guarded (same route without failover)",
                f"{delta:+.1f}% (req/s {rps:+.1f}%)",
                "≤ +10%",
                delta <= 10.0,
            )
        )
    return out


def _fmt(value: float, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec's width for a missing figure."""
    if value == value:
        return format(value, spec)
    width = re.match(r"\d*", spec)
    return "—".rjust(int(width.group(0)) if width and width.group(0) else 1)


def table(summaries: Sequence[Summary]) -> str:
    head = (
        f"{'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} "
        f"{'up µs/req':>10} {'other%':>6} │ {'CPU×ngx':>8} {'req/s×ngx':>9} {'p50×ngx':>8} "
        f"{'p99×ngx':>8}  what"
    )
    lines = [head, "─" * len(head)]
    for s in summaries:
        flag = f"  [{s.unexpected_responses} unexpected]" if s.unexpected_responses else ""
        lines.append(
            f"{s.target:<10} {_fmt(s.rps, '9.0f')} {_fmt(s.p50_ms, '8.2f')} "
            f"{_fmt(s.p99_ms, '8.2f')} {_fmt(s.cpu_us_per_req, '11.1f')} "
            f"{_fmt(s.upstream_cpu_us_per_req, '10.1f')} {_fmt(s.core_other_pct, '6.0f')} │ "
            f"{_fmt(s.cpu_x_nginx, '8.2f')} "
            f"{_fmt(s.rps_x_nginx, '9.2f')} {_fmt(s.p50_x_nginx, '8.2f')} "
            f"{_fmt(s.p99_x_nginx, '8.2f')}  {s.label}{flag}"
        )
    return "\n".join(lines)


# -- setup -----------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    procs: Processes
    target_core: int | None
    load_core: int | None
    ports: dict[str, int] = field(default_factory=dict)

    def values(self) -> dict[str, object]:
        return {
            "tmp": self.tmp,
            "body": BODY,
            "admin_token": ADMIN_TOKEN,
            # the shared rate-limit row uses the machine's Redis, under a prefix of its own
            "redis_url": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "redis_prefix": f"rp-bench-{os.getpid()}",
            **{f"{k}_port": v for k, v in self.ports.items()},
        }

    def write(self, template: str, name: str) -> Path:
        path = self.tmp / name
        path.write_text(render((TEMPLATES / template).read_text(), self.values()))
        return path


def start_nginx(env: Env, name: str, template: str, core: int | None, probe: str) -> Started:
    conf = env.write(template, f"{name}.conf")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    item = env.procs.start(
        name,
        [nginx, "-p", str(env.tmp), "-e", str(env.tmp / f"{name}-startup.log"), "-c", str(conf)],
        core,
    )
    wait_ready(item, probe)
    return item


def start_upstream(env: Env) -> Started:
    static = env.tmp / "static"
    static.mkdir(exist_ok=True)
    pattern = bytes(range(256))
    (static / "blob.bin").write_bytes(pattern * (BLOB_BYTES // len(pattern)))
    env.ports["upstream"] = free_port()
    item = start_nginx(
        env,
        "upstream",
        "nginx-upstream.conf",
        env.load_core,
        f"http://127.0.0.1:{env.ports['upstream']}/",
    )
    reply = http("GET", f"http://127.0.0.1:{env.ports['upstream']}/blob/1")
    if reply.status != 200 or len(reply.body) != BLOB_BYTES:
        raise RuntimeError(f"upstream /blob/ answers {reply.status} with {len(reply.body)} bytes")
    return item


def start_proxy(env: Env, template: str) -> Started:
    env.ports["proxy"] = free_port()
    env.ports["admin"] = free_port()
    config = env.write(template, "proxy.yaml")
    check = subprocess.run(
        [PYTHON, "-m", "proxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"the bench config is invalid:\n{check.stdout}{check.stderr}")
    item = env.procs.start(
        "resilience-proxy",
        [PYTHON, "-m", "proxy", "run", "--config", str(config), "--log-level", "warning"],
        env.target_core,
    )
    wait_ready(item, f"http://127.0.0.1:{env.ports['admin']}/healthz")
    return item


def admin(env: Env, method: str, path: str) -> Reply:
    return http(
        method,
        f"http://127.0.0.1:{env.ports['admin']}{path}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )


def proxy_status(env: Env) -> dict[str, Any]:
    reply = admin(env, "GET", "/status")
    if reply.status != 200:
        raise RuntimeError(f"GET /status answered {reply.status}")
    document: dict[str, Any] = json.loads(reply.body)
    return document


def route_status(env: Env, name: str) -> dict[str, Any]:
    for route in proxy_status(env)["routes"]:
        if route["name"] == name:
            found: dict[str, Any] = route
            return found
    raise RuntimeError(f"route {name} missing from /status")


@contextlib.contextmanager
def blackhole(env: Env) -> Iterator[socket.socket]:
    """A listening socket that never accepts: connections complete, nothing ever answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    env.ports["blackhole"] = sock.getsockname()[1]
    try:
        yield sock
    finally:
        sock.close()


def poll(what: str, test: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def hold_bulkhead(env: Env) -> socket.socket:
    """Occupy route `full`'s only slot with a request the blackhole upstream never answers."""
    holder = socket.create_connection(("127.0.0.1", env.ports["proxy"]), timeout=5)
    holder.sendall(b"GET /full/hold HTTP/1.1\r\nHost: bench\r\n\r\n")

    def held() -> bool:
        bulkhead = route_status(env, "full").get("bulkhead") or {}
        return bool(bulkhead.get("in_flight") == 1)

    poll("the bulkhead slot of route full to be taken", held)
    return holder


def force_breaker_open(env: Env, base: str) -> None:
    http("GET", f"{base}/open/warm")  # a breaker created lazily exists after one request
    reply = admin(env, "POST", "/breakers/open/open")
    if reply.status != 200:
        raise RuntimeError(f"POST /breakers/open/open answered {reply.status}: {reply.body!r}")


def validate(target: Target) -> str | None:
    """A problem with `target`'s answer (wrong status, body or reason), or None."""
    try:
        reply = http("GET", target.url)
    except (OSError, HTTPException) as exc:
        return f"{target.key}: {exc!r}"
    if reply.status != target.expect_status:
        return f"{target.key}: status {reply.status}, expected {target.expect_status}"
    if target.expect_status == 200 and reply.body != BODY.encode():
        return f"{target.key}: body differs from the upstream's ({len(reply.body)} bytes)"
    if target.expect_reason is not None:
        reason = reply.headers.get("X-Resilience-Reason")
        if reason != target.expect_reason:
            return f"{target.key}: X-Resilience-Reason {reason!r}, expected {target.expect_reason}"
    return None


# -- modes -----------------------------------------------------------------------------------


def throughput(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    upstream = start_upstream(env)
    up = f"http://127.0.0.1:{env.ports['upstream']}"
    body_file = env.tmp / "body.json"
    body_file.write_text(BODY)
    with blackhole(env):
        env.ports["nginx"] = free_port()
        nginx = start_nginx(
            env,
            "nginx-proxy",
            "nginx-proxy.conf",
            env.target_core,
            f"http://127.0.0.1:{env.ports['nginx']}/",
        )
        env.ports["trivial"] = free_port()
        trivial = env.procs.start(
            "aiohttp-trivial",
            [
                PYTHON,
                str(BENCH_DIR / "servers.py"),
                "trivial",
                "--port",
                str(env.ports["trivial"]),
                "--body-file",
                str(body_file),
            ],
            env.target_core,
        )
        wait_ready(trivial, f"http://127.0.0.1:{env.ports['trivial']}/")
        env.ports["naive"] = free_port()
        naive = env.procs.start(
            "aiohttp-naive-proxy",
            [
                PYTHON,
                str(BENCH_DIR / "servers.py"),
                "naive-proxy",
                "--port",
                str(env.ports["naive"]),
                "--upstream",
                up,
            ],
            env.target_core,
        )
        wait_ready(naive, f"http://127.0.0.1:{env.ports['naive']}/")
        proxy = start_proxy(env, "proxy.yaml")
        base = f"http://127.0.0.1:{env.ports['proxy']}"
        ngx = f"http://127.0.0.1:{env.ports['nginx']}"

        all_targets = [
            Target("direct", "wrk → upstream nginx (no proxy; CPU column empty)", f"{up}/x", None),
            Target("nginx", "nginx reverse proxy, 1 worker, keep-alive pool", f"{ngx}/x", nginx),
            Target(
                "trivial",
                "bare aiohttp handler, body from memory (no upstream)",
                f"http://127.0.0.1:{env.ports['trivial']}/x",
                trivial,
                uses_upstream=False,
            ),
            Target(
                "naive",
                "naive aiohttp reverse proxy (ClientSession, read, answer)",
                f"http://127.0.0.1:{env.ports['naive']}/x",
                naive,
            ),
            Target("plain", "(a) resilience-proxy: timeouts only", f"{base}/plain/x", proxy),
            Target("retry", "(b) + retries configured (none taken)", f"{base}/retry/x", proxy),
            Target("guarded", "(c) + breaker + bulkhead", f"{base}/guarded/x", proxy),
            Target(
                "failover",
                "(g) (c) + failover to a second target (primary healthy)",
                f"{base}/failover/x",
                proxy,
            ),
            Target(
                "fallback", "(d) + cached fallback (stores every 200)", f"{base}/fallback/x", proxy
            ),
            Target(
                "limited", "(g) + local rate limit (never refusing)", f"{base}/limited/x", proxy
            ),
            Target(
                "shared",
                "(h) + shared rate limit on Redis (never refusing)",
                f"{base}/shared/x",
                proxy,
            ),
            Target(
                "open",
                "(e) breaker forced open: 503 fast path",
                f"{base}/open/x",
                proxy,
                503,
                "breaker-open",
                uses_upstream=False,
            ),
            Target(
                "full",
                "(f) bulkhead full: 503 at once",
                f"{base}/full/x",
                proxy,
                503,
                "bulkhead-full",
                uses_upstream=False,
            ),
        ]
        wanted = set(args.only.split(",")) if args.only else None
        targets = [t for t in all_targets if wanted is None or t.key in wanted | {"nginx"}]

        holder: socket.socket | None = None
        try:
            if any(t.key == "open" for t in targets):
                force_breaker_open(env, base)
            if any(t.key == "full" for t in targets):
                holder = hold_bulkhead(env)
            problems = [p for p in (validate(t) for t in targets) if p]
            if problems:
                raise RuntimeError("targets answer wrongly:\n  " + "\n  ".join(problems))
            stages = {r["name"]: r.get("stages") for r in proxy_status(env)["routes"]}
            print("resilience-proxy route stages:", file=sys.stderr)
            for name, names in stages.items():
                print(f"  {name:<9} {' → '.join(names or [])}", file=sys.stderr)

            warm = max(1, min(2, args.duration // 3))
            for t in targets:
                print(f"warm-up {t.key} ({warm}s)", file=sys.stderr)
                run_wrk(t.url, warm, args.connections, env.load_core)
            if any(t.key == "fallback" for t in targets):
                cached = route_status(env, "fallback").get("cache", {})
                if not cached.get("entries"):
                    print("WARNING: the fallback route stored nothing", file=sys.stderr)

            runs: list[Run] = []
            for repeat in range(args.repeats):
                for t in targets:
                    run = measure(
                        t,
                        upstream,
                        args.duration,
                        args.connections,
                        env.load_core,
                        env.target_core,
                        repeat,
                    )
                    runs.append(run)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {t.key:<9} {run.wrk.rps:9.0f} req/s  "
                        f"p50 {run.wrk.p50_ms:6.2f} ms  p99 {run.wrk.p99_ms:6.2f} ms  "
                        f"CPU {_fmt(run.cpu_us_per_req, '6.1f')} µs/req  "
                        f"(others on core: {_fmt(run.core_other_pct, '.0f')}%)",
                        file=sys.stderr,
                    )
                    time.sleep(0.3)
            fallback_cache = (
                route_status(env, "fallback").get("cache")
                if any(t.key == "fallback" for t in targets)
                else None
            )
            proxy_memory = memory_kib(proxy.pid)
        finally:
            if holder is not None:
                holder.close()
    summaries = summarize(targets, runs)
    found = checks(summaries)
    print()
    print(table(summaries))
    print()
    for c in found:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[c.ok]
        print(f"  [{verdict}] {c.name}: {c.value}  (goal: {c.goal})")
    print(f"  resilience-proxy memory after the run: {proxy_memory}")
    return {
        "mode": "throughput",
        "targets": [
            {"key": t.key, "label": t.label, "url": t.url, "expect_status": t.expect_status}
            for t in targets
        ],
        "route_stages": stages,
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(s) for s in summaries],
        "checks": [asdict(c) for c in found],
        "fallback_cache": fallback_cache,
        "proxy_memory_kib": proxy_memory,
    }


def cache_fill(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """Fill the 64 MiB fallback store with ~256 KiB entries; report the proxy's peak RSS."""
    start_upstream(env)
    proxy = start_proxy(env, "proxy-cache-fill.yaml")
    base = f"http://127.0.0.1:{env.ports['proxy']}/blobs/blob"
    first = http("GET", f"{base}/warm")
    if first.status != 200 or len(first.body) != BLOB_BYTES:
        raise RuntimeError(f"/blobs/ answers {first.status} with {len(first.body)} bytes")
    baseline = memory_kib(proxy.pid)

    def fetch(n: int) -> int:
        reply = http("GET", f"{base}/{n}", timeout=30)
        return reply.status if len(reply.body) == BLOB_BYTES else -reply.status

    deadline = time.monotonic() + args.fill_timeout
    sent, extra, bad = 0, 0, 0
    cache: dict[str, Any] = {}
    batch = max(32, args.fill_concurrency)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.fill_concurrency) as pool:
        while time.monotonic() < deadline and sent < 20_000:
            statuses = list(pool.map(fetch, range(sent, sent + batch)))
            sent += batch
            bad += sum(1 for s in statuses if s != 200)
            cache = proxy_status(env)["cache"]
            if cache.get("evictions", 0) > 0:  # full: keep churning for a while, then stop
                extra += batch
                if extra >= 128:
                    break
    peak = memory_kib(proxy.pid)
    hwm = peak["VmHWM"] or 0
    budget_kib = (RSS_BASE_BUDGET + CACHE_BUDGET) // 1024
    full = cache.get("evictions", 0) > 0
    print()
    print(f"requests: {sent} × {BLOB_BYTES // 1024} KiB ({bad} not 200 / short)")
    print(
        f"cache: {cache.get('entries')} entries, {cache.get('bytes', 0) / MiB:.1f} MiB of "
        f"{cache.get('max_bytes', 0) / MiB:.0f} MiB, {cache.get('evictions')} evictions"
        f"{'' if full else '  (NOT FULL: timed out)'}"
    )
    print(f"RSS before fill: VmRSS {baseline['VmRSS']} KiB, VmHWM {baseline['VmHWM']} KiB")
    print(
        f"RSS after fill:  VmRSS {peak['VmRSS']} KiB, VmHWM {hwm} KiB "
        f"({hwm / 1024:.1f} MiB; goal < {budget_kib / 1024:.0f} MiB = 64 MiB + cache budget): "
        f"{'PASS' if full and hwm < budget_kib else 'FAIL'}"
    )
    return {
        "mode": "cache-fill",
        "requests": sent,
        "concurrency": args.fill_concurrency,
        "bad_responses": bad,
        "entry_bytes": BLOB_BYTES,
        "cache": cache,
        "cache_full": full,
        "memory_before_kib": baseline,
        "memory_after_kib": peak,
        "goal_kib": budget_kib,
        "ok": full and hwm < budget_kib,
    }


def machine() -> dict[str, Any]:
    cpu = ""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions: dict[str, str] = {}
    for name, cmd in (("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"])):
        with contextlib.suppress(OSError):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
    for package in ("aiohttp", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="resilience-proxy vs nginx vs aiohttp")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s × 1 repeat")
    parser.add_argument("--only", help="comma-separated target keys (nginx is always kept)")
    parser.add_argument("--cache-fill", action="store_true", help="peak RSS after a cache fill")
    parser.add_argument("--fill-timeout", type=float, default=120.0, help="cache-fill bound (s)")
    parser.add_argument(
        "--fill-concurrency", type=int, default=8, help="cache-fill: requests in flight (8)"
    )
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeats = 3, 1
    if min(args.duration, args.repeats, args.connections, args.fill_concurrency) < 1:
        parser.error("--duration, --repeats, --connections, --fill-concurrency must be >= 1")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP end the run through `finally`, so every started server is stopped."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _exit_on_signal if sig != signal.SIGINT else signal.default_int_handler)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (make sysdeps installs it)", file=sys.stderr)
            return 2
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        print("nginx is not installed (make sysdeps installs it)", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    target_core, load_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if target_core is None:
        print("WARNING: fewer than 2 usable cores: nothing is pinned", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="rp-bench-"))
    procs = Processes(tmp)
    env = Env(tmp, procs, target_core, load_core)
    started = time.time()
    try:
        result = cache_fill(env, args) if args.cache_fill else throughput(env, args)
    except (
        RuntimeError,
        ValueError,
        OSError,
        HTTPException,
        subprocess.SubprocessError,
    ) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        args={k: v for k, v in vars(args).items()},
        pinning={"under_test_core": target_core, "upstream_and_wrk_core": load_core},
        machine=machine(),
    )
    if not args.no_json:
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        path = RESULTS / f"{result['mode']}-{stamp}.json"
        path.write_text(json.dumps(no_nan(result), indent=1, default=str) + "\n")
        print(f"\nresults: {path.relative_to(REPO)}")
    if result["mode"] == "cache-fill":
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

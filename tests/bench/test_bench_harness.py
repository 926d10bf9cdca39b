"""Unit tests of the bench harness's parsing and arithmetic (no servers)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import run  # bench/ is not a package: imported from its directory

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:8080/plain/x
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  500.00us  31.20ms   90.00%
    Req/Sec    15.20k     1.10k   17.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    2.05ms
     90%    3.10ms
     99%    1.20s
  151234 requests in 10.01s, 180.12MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 17
Requests/sec:  15108.29
Transfer/sec:     17.99MB
"""


def test_parse_wrk_reads_throughput_percentiles_in_ms_and_failures() -> None:
    result = run.parse_wrk(WRK_OUTPUT)
    assert result.requests == 151234
    assert result.seconds == pytest.approx(10.01)
    assert result.rps == pytest.approx(15108.29)
    assert result.p50_ms == pytest.approx(0.85)
    assert result.p75_ms == pytest.approx(2.05)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.non_2xx_3xx == 17
    assert result.socket_errors == 6


def test_parse_wrk_without_errors_counts_zero() -> None:
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    result = run.parse_wrk(clean)
    assert (result.non_2xx_3xx, result.socket_errors) == (0, 0)


def test_parse_wrk_without_latency_distribution_is_an_error() -> None:
    without = WRK_OUTPUT.replace("     99%    1.20s\n", "")
    with pytest.raises(ValueError, match="99%"):
        run.parse_wrk(without)


def test_parse_wrk_time_units() -> None:
    assert run.parse_wrk_time("12us") == pytest.approx(0.012)
    assert run.parse_wrk_time("3.5ms") == pytest.approx(3.5)
    assert run.parse_wrk_time("2s") == pytest.approx(2000.0)
    assert run.parse_wrk_time("1.5m") == pytest.approx(90_000.0)
    with pytest.raises(ValueError):
        run.parse_wrk_time("3 parsecs")


def test_stat_ticks_survive_a_command_name_with_spaces_and_parentheses() -> None:
    # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
    #         cmajflt utime stime cutime cstime ...
    stat = "4242 (nginx: worker (x)) S 4241 4241 4241 0 -1 4194560 10 0 0 0 150 50 7 3 20 0"
    assert run.parse_stat_ticks(stat) == 200  # children's cutime/cstime not counted twice
    assert run.parse_stat_ppid(stat) == 4241


def test_status_memory_lines_in_kib() -> None:
    status = "Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   65432 kB\n"
    assert run.parse_status_kib(status, "VmHWM") == 123456
    assert run.parse_status_kib(status, "VmRSS") == 65432
    assert run.parse_status_kib(status, "VmSwap") is None


def test_core_busy_excludes_idle_and_iowait() -> None:
    proc_stat = (
        "cpu  900 0 900 9000 90 0 0 0 0 0\n"
        "cpu0 100 2 30 5000 40 1 2 3 0 0\n"
        "cpu1 800 0 870 4000 50 0 0 0 0 0\n"
    )
    assert run.parse_core_busy(proc_stat, 0) == 100 + 2 + 30 + 1 + 2 + 3
    with pytest.raises(ValueError):
        run.parse_core_busy(proc_stat, 2)


def test_cpu_per_request_converts_ticks_to_microseconds() -> None:
    # 250 ticks at 100 Hz = 2.5 s of CPU for 50 000 requests = 50 µs each.
    assert run.cpu_us_per_request(250, 50_000, tick_hz=100) == pytest.approx(50.0)
    assert math.isnan(run.cpu_us_per_request(10, 0))


def _run(target: str, rps: float, cpu: float, repeat: int, non2xx: int = 0) -> run.Run:
    wrk = run.WrkResult(int(rps * 10), 10.0, rps, 1.0, 1.5, 2.0, cpu / 10, non2xx, 0)
    return run.Run(target, repeat, wrk, cpu, 20.0, 0.0)


def test_summary_takes_medians_then_ratios_to_nginx() -> None:
    targets = [
        run.Target("nginx", "", "", None),
        run.Target("plain", "", "", None),
        run.Target("open", "", "", None, expect_status=503),
    ]
    runs = [
        _run("nginx", 10_000, 50, 0),
        _run("nginx", 9_000, 60, 1),
        _run("nginx", 11_000, 55, 2),
        _run("plain", 2_000, 400, 0, non2xx=3),
        _run("plain", 2_500, 500, 1),
        _run("plain", 1_000, 1_000, 2),
        _run("open", 5_000, 100, 0, non2xx=50_000),
    ]
    by = {s.target: s for s in run.summarize(targets, runs)}
    assert by["nginx"].cpu_us_per_req == 55 and by["nginx"].rps == 10_000
    assert by["plain"].cpu_us_per_req == 500  # the median, not the mean (633)
    assert by["plain"].cpu_x_nginx == pytest.approx(500 / 55)
    assert by["plain"].rps_x_nginx == pytest.approx(0.2)
    assert by["plain"].p99_x_nginx == pytest.approx(50 / 5.5)
    assert by["plain"].unexpected_responses == 3  # a 200 route answering otherwise is flagged
    assert by["open"].unexpected_responses == 0  # a rejection route answers 503 by design


def test_checks_compare_routes_with_the_budgets_the_issues_set() -> None:
    def summary(key: str, cpu: float, rps: float = 1000.0) -> run.Summary:
        return run.Summary(key, "", rps, 1.0, 2.0, cpu, 20.0, cpu_x_nginx=cpu / 50)

    found = {
        c.name: c
        for c in run.checks(
            [
                summary("nginx", 50),
                summary("naive", 450),
                summary("plain", 400),
                summary("retry", 445),  # +11.25%: over the 10% budget
                summary("fallback", 440),  # +10%: within 15%
                summary("trivial", 100),
                summary("open", 150),
            ]
        )
    }
    assert found["plain route CPU/req vs nginx"].ok is True
    assert found["retry route CPU/req vs plain"].ok is False
    assert found["fallback route CPU/req vs plain"].ok is True
    assert found["open rejection CPU/req vs trivial aiohttp handler"].value.startswith("1.50×")


def test_render_fills_placeholders_and_refuses_missing_ones() -> None:
    text = "listen 127.0.0.1:@{port}; set $x 1; token: ${TOKEN:-} @@{literal}"
    assert run.render(text, {"port": 8080}) == (
        "listen 127.0.0.1:8080; set $x 1; token: ${TOKEN:-} @{literal}"
    )
    with pytest.raises(KeyError):
        run.render("@{missing}", {})


def test_templates_render_with_every_placeholder_the_harness_provides() -> None:
    values: dict[str, object] = {"tmp": "/tmp/x", "body": run.BODY, "admin_token": "t"}
    values.update(redis_url="redis://127.0.0.1:6379/0", redis_prefix="rp-bench-1")
    for name in ("upstream", "nginx", "proxy", "admin", "blackhole"):
        values[f"{name}_port"] = 1
    for template in sorted(run.TEMPLATES.iterdir()):
        rendered = run.render(template.read_text(), values)
        assert "@{" not in rendered, template.name


def test_no_nan_makes_strict_json() -> None:
    assert run.no_nan({"a": [float("nan"), 1.0], "b": (2, float("nan"))}) == {
        "a": [None, 1.0],
        "b": [2, None],
    }

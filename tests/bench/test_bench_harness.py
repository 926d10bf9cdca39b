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


K6_SUMMARY = {
    "metrics": {
        "http_req_duration": {
            "type": "trend",
            "values": {"avg": 0.4, "min": 0.1, "med": 0.25, "p(90)": 0.6, "p(99)": 1.9, "max": 12.0},
        },
        "http_reqs": {"type": "counter", "values": {"count": 10_000, "rate": 999.8}},
        "dropped_iterations": {"type": "counter", "values": {"count": 3, "rate": 0.3}},
        "http_req_failed": {"type": "rate", "values": {"rate": 0.001, "passes": 10, "fails": 9990}},
    }
}


def test_parse_k6_summary_reads_percentiles_rate_and_drops() -> None:
    result = run.parse_k6_summary(K6_SUMMARY)
    assert (result.requests, result.rate) == (10_000, pytest.approx(999.8))
    assert (result.p50_ms, result.p99_ms) == (pytest.approx(0.25), pytest.approx(1.9))
    assert result.dropped == 3
    assert result.failed_rate == pytest.approx(0.001)


def test_parse_k6_summary_without_drops_counts_zero_and_refuses_missing_figures() -> None:
    metrics = {k: v for k, v in K6_SUMMARY["metrics"].items() if k != "dropped_iterations"}
    assert run.parse_k6_summary({"metrics": metrics}).dropped == 0
    no_p99 = {**metrics, "http_req_duration": {"values": {"med": 1.0}}}
    with pytest.raises(ValueError, match="p\\(99\\)"):
        run.parse_k6_summary({"metrics": no_p99})
    with pytest.raises(ValueError, match="http_reqs"):
        run.parse_k6_summary({"metrics": {"http_req_duration": metrics["http_req_duration"]}})
    with pytest.raises(ValueError):
        run.parse_k6_summary({})


def test_k6_script_uses_the_constant_arrival_rate_executor() -> None:
    assert "executor: 'constant-arrival-rate'" in run.K6_SCRIPT
    assert "handleSummary" in run.K6_SCRIPT and "p(99)" in run.K6_SCRIPT


def _k6(p50: float, p99: float, dropped: int = 0) -> run.K6Result:
    return run.K6Result(1000, 1000.0, p50, p99, dropped, 0.0)


def test_open_loop_medians_and_the_issue_targets() -> None:
    runs = [
        ("direct", 1000, _k6(0.10, 1.0)),
        ("direct", 1000, _k6(0.12, 1.4)),
        ("direct", 1000, _k6(0.11, 9.0)),
        ("nginx", 1000, _k6(0.20, 2.0)),
        ("allpol", 1000, _k6(0.30, 2.4)),  # +0.19 ms p50: over budget; p99 1.2×: within
        ("direct", 2000, _k6(0.1, 1.0, dropped=2)),
        ("nginx", 2000, _k6(0.2, 2.0)),
        ("allpol", 2000, _k6(0.3, 5.0)),  # 2.5× nginx's p99: over
    ]
    summaries = run.summarize_open_loop(runs)
    by = {(s.target, s.rate): s for s in summaries}
    assert by[("direct", 1000)].p50_ms == pytest.approx(0.11)  # the median of 3
    assert by[("direct", 1000)].p99_ms == pytest.approx(1.4)
    assert by[("direct", 1000)].repeats == 3
    found = {c.name: c for c in run.open_loop_checks(summaries)}
    assert found["open loop 1000/s: allpol added p50 over direct"].ok is False
    assert found["open loop 1000/s: allpol added p50 over direct"].value.startswith("0.190 ms")
    assert found["open loop 1000/s: allpol p99 vs nginx p99"].ok is True
    assert found["open loop 2000/s: allpol p99 vs nginx p99"].ok is False
    assert found["open loop 1000/s: k6 dropped iterations against direct"].ok is True
    assert found["open loop 2000/s: k6 dropped iterations against direct"].ok is False
    assert "allpol" in run.open_loop_table(summaries)


def _mem_run(before: int, after: int, hwm_before: int, hwm_after: int) -> run.Run:
    wrk = run.WrkResult(100, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 0, 0)
    return run.Run("upload", 0, wrk, 1.0, 1.0, 0.0, before, after, hwm_before, hwm_after)


def test_rss_growth_counts_the_peak_during_the_runs() -> None:
    # The peak (VmHWM) rose during the first run only; RSS settled lower afterwards.
    runs = [_mem_run(50_000, 51_000, 60_000, 55_000 + 60_000), _mem_run(51_000, 52_000, 115_000, 115_000)]
    assert run.rss_growth(runs) == 115_000 - 50_000
    # An earlier, higher peak says nothing about these runs: RSS after them counts.
    assert run.rss_growth([_mem_run(50_000, 53_000, 90_000, 90_000)]) == 3_000
    assert math.isnan(run.rss_growth([]))


def test_ratios_are_to_each_rows_own_reference() -> None:
    targets = [
        run.Target("nginx", "", "", None),
        run.Target("nginx64", "", "", None, reference="nginx64"),
        run.Target("allpol64", "", "", None, reference="nginx64"),
        run.Target("upload", "", "", None, measure_rss=True),
    ]
    runs = [
        _run("nginx", 10_000, 20, 0),
        _run("nginx64", 2_000, 80, 0),
        _run("allpol64", 1_000, 160, 0),
        _mem_run(50_000, 51_024, 60_000, 60_000),
    ]
    by = {s.target: s for s in run.summarize(targets, runs)}
    assert by["allpol64"].cpu_x_nginx == pytest.approx(2.0)  # to nginx64, not nginx
    assert by["upload"].rss_growth_kib == 1_024
    found = {c.name: c for c in run.checks(list(by.values()))}
    assert found["64 KiB response, allpol route CPU/req vs nginx"].ok is True
    assert found["1 MiB upload, proxy RSS growth"].ok is True


def test_many_routes_config_is_a_valid_config_with_every_policy(tmp_path: Path) -> None:
    from proxy.config import load_config

    values = {"proxy_port": 1, "admin_port": 2, "upstream_port": 3, "admin_token": "t", "tmp": tmp_path}
    path = tmp_path / "many.yaml"
    path.write_text(run.many_routes_config(values))
    config = load_config(str(path), env={})
    assert len(config.routes) == run.MANY_ROUTES
    route = config.routes[42]
    assert route.name == "r042"
    assert None not in (route.retry, route.breaker, route.bulkhead, route.fallback)


def test_memory_checks_against_the_issue_budgets() -> None:
    found = {
        c.name: c
        for c in run.memory_checks(
            {"VmRSS": 50_000}, {"VmRSS": 70_000}, {"VmRSS": 78_000}, 1_000_000
        )
    }
    idle = found["idle RSS (100 routes)"]
    assert idle.ok is True
    assert idle.value == "50,000 kB (48.8 MiB, 51.2 MB)" and idle.goal == "≤ 60,000 kB, /proc's unit"
    over = run.memory_checks({"VmRSS": 60_001}, {}, {}, 0)
    assert [c.ok for c in over] == [False]
    late = found["RSS after 1000000 requests vs after the first 10,000"]
    assert late.ok is False and late.value == "+11.4%"


def test_lua_scripts_render() -> None:
    upload = run.render(run.UPLOAD_LUA, {"size": run.UPLOAD_BYTES})
    assert 'wrk.method = "POST"' in upload and str(run.UPLOAD_BYTES) in upload
    spread = run.render(run.SPREAD_LUA, {"routes": 100, "limit": 10_000, "start": 20_000})
    assert "local limit = 10000" in spread and "wrk.thread:stop()" in spread
    assert "local i = 20000" in spread


def test_memory_rounds_last_what_the_remaining_requests_need() -> None:
    # 10,000 at 5,000/s: 2 s + 20 % + 1 s, rounded up
    assert run.round_seconds(10_000, 5_000.0) == 4
    assert run.round_seconds(1_000_000, 5_000.0) == run.MEMORY_ROUND_SECONDS  # capped
    assert run.round_seconds(10, 5_000.0) == 2  # never below 2 s
    assert run.round_seconds(10_000, 0.0) == run.MEMORY_ROUND_SECONDS  # no rate known yet


def test_spread_counts_rounds_and_takes_the_rate_only_from_full_length_rounds() -> None:
    def wrk(requests: int, non2xx: int = 0, errors: int = 0) -> run.WrkResult:
        return run.WrkResult(requests, 20.0, 0.0, 1.0, 1.0, 1.0, 1.0, non2xx, errors)

    spread = run.Spread()
    spread.add(wrk(10_003), 7, 10_000)  # stopped at its limit: says nothing of the rate
    assert (spread.requests, spread.rate) == (10_003, run.MEMORY_RATE_GUESS)
    spread.add(wrk(90_000, non2xx=3, errors=2), 20, 990_000)  # ran all 20 s
    assert spread.rate == 4_500.0
    assert (spread.requests, spread.unexpected, spread.rounds) == (100_003, 5, 2)


def test_rss_growth_from_the_warm_up_baseline_and_sampled_peaks() -> None:
    # VmHWM never rose (an earlier row holds the lifetime peak): the sampled VmRSS counts.
    run_ = _mem_run(52_000, 51_000, 90_000, 90_000)
    run_.rss_peak_kib = 56_000
    assert run.rss_growth([run_]) == 56_000 - 52_000
    # From before the warm-up, whose own peak (58 000) was the highest.
    assert run.rss_growth([run_], 50_000, (58_000,)) == 8_000
    targets = [run.Target("upload", "", "", None, measure_rss=True)]
    (summary,) = run.summarize(targets, [run_], {"upload": (50_000, 58_000)})
    assert summary.rss_growth_kib == 8_000


def test_rss_sampler_sees_this_process() -> None:
    import os
    import time

    with run.RssSampler(os.getpid(), interval=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.peak is not None and sampler.peak > 1000

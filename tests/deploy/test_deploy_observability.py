"""Alert rules, the Grafana dashboard and the Prometheus config: valid for their tools, using
only DESIGN §9 metric names, and every name actually exported by a running proxy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    CONDITIONAL_METRICS,
    DEPRECATED_METRICS,
    DESIGN_METRICS,
    PREFIX,
    REPO,
    RunningProxy,
    design_series_names,
    family_name,
    http_get,
    require_tool,
)
from prometheus_client.parser import text_string_to_metric_families

import proxy

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "resilience-proxy.json"
DOCS = REPO / "docs" / "deployment.md"

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, label matchers `{...}`, ranges `[...]` and `by/without (...)` label lists are
    removed first; what is left that is an identifier not followed by `(` (a function) and
    not a keyword is a metric name.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(resilience_proxy_request_duration_"
        'seconds_bucket{job=~"$job", route=~"a|b"}[$__rate_interval]))) / on (job) group_left '
        "up offset 5m > bool 0"
    )
    assert metric_names(expr) == {"resilience_proxy_request_duration_seconds_bucket", "up"}


def test_every_design_metric_has_a_series_name() -> None:
    assert len(design_series_names()) == len(DESIGN_METRICS) + 2 * sum(
        kind == "histogram" for kind in DESIGN_METRICS.values()
    )


# --- alert rules -------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text("utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS / "alerts.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"],
        cwd=PROMETHEUS, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_exercised_firing_and_silent() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yaml").read_text("utf-8"))["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names
    assert silent == names


def test_alerts_cover_the_design_conditions() -> None:
    """DESIGN §11: one breaker open (per route and upstream) and several; retry success <
    95%; a Postgres target critical; > 10% of requests timing out; stale answers > 10% for
    10 minutes; the last reload failed; credentials missing; the state backend down; the
    proxy down."""
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    by_metric = {name: [a for a, e in exprs.items() if name in e] for name in (
        "resilience_proxy_breaker_state", "resilience_proxy_retry_calls_total",
        "resilience_proxy_pg_status", "resilience_proxy_requests_total", "up{",
    )}  # fmt: skip
    assert all(by_metric.values()), by_metric
    assert ") > 1" in exprs["ResilienceProxyBreakersOpen"]
    one = exprs["ResilienceProxyBreakerOpen"]
    assert "by (job, route, upstream)" in one and ") == 1" in one
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert rules["ResilienceProxyBreakerOpen"]["for"] == "2m"
    stale = exprs["ResilienceProxyStaleServingHigh"]
    assert 'outcome="fallback-stale"' in stale and "> 0.10" in stale
    assert rules["ResilienceProxyStaleServingHigh"]["for"] == "10m"
    assert "config_last_reload_success" in exprs["ResilienceProxyConfigReloadFailed"]
    assert ") == 0" in exprs["ResilienceProxyCredentialsMissing"]
    assert "state_backend_up" in exprs["ResilienceProxyStateBackendDown"]
    assert "< 0.95" in exprs["ResilienceProxyRetrySuccessRateLow"]
    assert 'status="critical"' in exprs["ResilienceProxyPostgresCritical"]
    assert 'outcome="timeout"' in exprs["ResilienceProxyTimeoutsHigh"]
    assert "> 0.10" in exprs["ResilienceProxyTimeoutsHigh"]


def test_alerts_carry_severity_for_summary_description_and_runbook() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in DOCS.read_text("utf-8").splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        doc, _, anchor = annotations["runbook_url"].partition("#")
        assert doc == "docs/deployment.md"
        assert anchor in headings, f"{rule['alert']}: no runbook heading #{anchor} in {DOCS}"


def test_alerts_use_only_design_metrics() -> None:
    known = set(design_series_names()) | {"up"}
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= known, rule["alert"]


def test_alert_job_selector_matches_the_scrape_jobs() -> None:
    """compose scrapes job "resilience-proxy"; the PodMonitor's job is "<ns>/resilience-proxy"."""
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text("utf-8"))
    jobs = [c["job_name"] for c in prometheus["scrape_configs"]]
    jobs.append("agents/" + "resilience-proxy")
    for rule in alert_rules():
        for pattern in re.findall(r'job=~"([^"]+)"', rule["expr"]):
            for job in jobs:
                assert re.fullmatch(pattern, job), (rule["alert"], pattern, job)
            assert not re.fullmatch(pattern, "node-exporter")


def test_compose_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return doc


def dashboard_exprs() -> list[str]:
    doc = dashboard()
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    return exprs


def variable_queries() -> list[str]:
    """The PromQL selectors inside `label_values(<selector>, label)` template queries."""
    selectors = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, query
        selectors.append(match.group(1))
    return selectors


def test_dashboard_shape() -> None:
    doc = dashboard()
    assert doc["uid"] == "resilience-proxy"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("request rate", "outcomes", "p50 / p99", "attempts", "retries", "breaker state",
                  "fallbacks", "bulkhead", "cache", "postgres status", "pool"):  # fmt: skip
        assert topic in titles, topic
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_only_design_metrics_and_covers_them_all() -> None:
    series = design_series_names()
    used: set[str] = set()
    for expr in dashboard_exprs() + variable_queries():
        names = metric_names(expr)
        assert names, expr
        assert names <= set(series), (names - set(series), expr)
        used |= {series[n] for n in names}
    assert not used & set(DEPRECATED_METRICS), used & set(DEPRECATED_METRICS)
    wanted = set(DESIGN_METRICS) - set(DEPRECATED_METRICS)
    assert used == wanted, wanted - used


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (Grafana variables replaced by plausible values)."""
    promtool = require_tool("promtool")
    rules = []
    for i, expr in enumerate(dashboard_exprs() + variable_queries()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$job", ".*")
        concrete = concrete.replace("$route", ".*")
        assert "$" not in concrete, expr
        rules.append({"record": f"dashboard:query:{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_histogram_quantiles_aggregate_by_le() -> None:
    for expr in dashboard_exprs():
        if "histogram_quantile" in expr:
            assert re.search(r"by \(le\b", expr) and "_bucket" in expr, expr


# --- against a running proxy -------------------------------------------------------------


def exported_families(proxy: RunningProxy) -> dict[str, str]:
    status, body = http_get(proxy.admin + "/metrics")
    assert status == 200
    return {f.name: f.type for f in text_string_to_metric_families(body)}


def test_running_proxy_exports_every_metric_the_dashboard_and_alerts_use(
    running_proxy: RunningProxy,
) -> None:
    exported = exported_families(running_proxy)
    series = design_series_names()
    used = set()
    for expr in dashboard_exprs() + variable_queries() + [r["expr"] for r in alert_rules()]:
        used |= {series[n] for n in metric_names(expr) if n in series}
    missing = {m for m in used - CONDITIONAL_METRICS if family_name(m) not in exported}
    assert not missing, f"used in deploy/ but not exported by the proxy: {sorted(missing)}"
    wrong_type = {m: exported[family_name(m)] for m in used if family_name(m) in exported
                  and exported[family_name(m)] != DESIGN_METRICS[m]}  # fmt: skip
    assert not wrong_type, wrong_type


def test_running_proxy_exports_no_undocumented_metric(
    running_proxy: RunningProxy,
) -> None:
    ours = {name for name in exported_families(running_proxy) if name.startswith(PREFIX)}
    declared = {family_name(m) for m in DESIGN_METRICS}
    assert ours <= declared, f"undocumented metrics: {sorted(ours - declared)}"


def test_running_proxy_exports_no_created_series_and_the_process_collectors(
    running_proxy: RunningProxy,
) -> None:
    """DESIGN §9: no `*_created` series (they were a fifth of all series); process_* and
    python_* for the sidecar's memory and CPU; build_info with version, revision, python."""
    status, body = http_get(running_proxy.admin + "/metrics")
    assert status == 200
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
    names = {s.name for s in samples}
    assert not {n for n in names if n.endswith("_created")}
    assert "process_resident_memory_bytes" in names and "process_cpu_seconds_total" in names
    assert "python_info" in names and "python_gc_collections_total" in names
    (build,) = [s for s in samples if s.name == PREFIX + "build_info"]
    assert build.value == 1.0
    assert set(build.labels) == {"version", "revision", "python"}
    assert build.labels["revision"] and build.labels["python"].count(".") == 2
    # The same release and revision `resilience-proxy --version` prints (proxy.version_info).
    assert (build.labels["version"], build.labels["revision"]) == proxy.version_info()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probe_endpoints_answer(running_proxy: RunningProxy, path: str) -> None:
    status, _ = http_get(running_proxy.admin + path)
    assert status == 200

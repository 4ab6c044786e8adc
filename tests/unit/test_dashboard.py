"""The Grafana dashboard: it loads, shows what an operator needs, and queries real series.

Every PromQL expression (panel targets, and the recording and alert rules too) is parsed by
the real promtool, and every metric it names must exist: the gateway's own (read from a
``Metrics`` built on a fresh registry), the recording rules', or the vLLM and Prometheus
series listed below.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/qwen-gateway.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
RULES = sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))

#: vLLM's series the dashboard reads (vLLM 0.32's /metrics), and Prometheus' own ``up``.
VLLM_METRICS = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
}
PROMETHEUS_METRICS = {"up"}

#: Panel title -> series it must show (the operator's questions, in the dashboard's words).
EXPECTED_PANELS = {
    "Queue wait p95 by class": {"priority_class:gateway_queue_wait_seconds:p95_5m"},
    "TTFT p95 by class": {"priority_class:gateway_time_to_first_token_seconds:p95_5m"},
    "p95 latency per task vs SLA": {
        "task:gateway_request_duration_seconds:p95_5m",
        "gateway:sla_latency_seconds",
    },
    "p95 TTFT per task vs SLA": {
        "task:gateway_time_to_first_token_seconds:p95_5m",
        "gateway:sla_ttft_seconds",
    },
    "Throughput by task": {"task:gateway_requests:rate5m"},
    "Outcomes": {"task:gateway_requests:rate5m"},
    "Error ratio by task": {"task:gateway_request_errors:ratio_rate5m"},
    "Rejections by reason": {"priority_class:gateway_rejections:rate5m"},
    "Upstream health": {"gateway_upstream_up"},
    "vLLM requests running and waiting": {"vllm:num_requests_waiting", "vllm:num_requests_running"},
    "vLLM KV cache usage": {"vllm:kv_cache_usage_perc"},
    "Gateway queue depth by class": {"gateway_queue_depth"},
    "Gateway in flight per upstream": {"gateway_inflight_requests"},
    "Saturation (autoscaling signal)": {":gateway_saturation_ratio:sum"},
    "Oldest queued request by class": {"priority_class:gateway_queue_oldest_wait_seconds:max"},
}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


# -- helpers -----------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_metric_names_helper() -> None:
    assert metric_names(
        'sum by (task, le) (rate(a_bucket{task=~"$task",x="y{z}"}[5m])) '
        "> on (task) group_left b:rec * 1e3 and c offset 5m"
    ) == {"a_bucket", "b:rec", "c"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(d[1m:10s])))") == {"d"}


def gateway_series() -> dict[str, set[str]]:
    """Every series name the gateway exports, with its label names."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, [("t", "realtime")], ["realtime"], ["vllm:8000"])
    metrics.watch_queue("realtime", lambda: 0.0)
    metrics.watch_inflight("vllm:8000", lambda: 0.0)
    metrics.watch_oldest_wait("realtime", lambda: 0.0)
    metrics.watch_saturation(lambda: 0.0)
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def recorded_series() -> set[str]:
    return {
        rule["record"]
        for path in RULES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def known_series() -> set[str]:
    return set(gateway_series()) | recorded_series() | VLLM_METRICS | PROMETHEUS_METRICS


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def as_promql(expr: str) -> str:
    """Grafana's variables -> plain PromQL. Ours appear only inside label matcher strings."""
    expr = re.sub(r"\$__(rate_)?interval\b", "5m", expr)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    assert "$" not in outside_strings, f"a Grafana variable outside a string: {expr}"
    return expr


# -- the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_valid_json_with_stable_identity() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "qwen-gateway"
    assert dashboard["title"] == "qwen-gateway"
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_has_the_expected_panels() -> None:
    dashboard = load_dashboard()
    shown: dict[str, set[str]] = {}
    for panel, target in targets(dashboard):
        shown.setdefault(panel["title"], set()).update(metric_names(target["expr"]))
    for title, needed in EXPECTED_PANELS.items():
        assert title in shown, f"missing panel {title!r}"
        assert needed <= shown[title], f"{title!r} does not show {sorted(needed - shown[title])}"


def test_every_panel_queries_the_provisioned_prometheus() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]["uid"]
    dashboard = load_dashboard()
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = []
    for panel in all_panels(load_dashboard()):
        g = panel["gridPos"]
        assert g["x"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        boxes.append((panel["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_every_dashboard_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule: a syntax error names the panel."""
    groups = [
        {
            "name": f"panel {panel['id']}: {panel['title']} / {target['refId']}",
            "rules": [{"record": "dashboard:check", "expr": as_promql(target["expr"])}],
        }
        for panel, target in targets(load_dashboard())
    ]
    assert groups
    rule_file = tmp_path / "dashboard.yml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_expression_uses_existing_series() -> None:
    known = known_series()
    for panel, target in targets(load_dashboard()):
        unknown = metric_names(target["expr"]) - known
        assert not unknown, f"panel {panel['title']!r} queries unknown series {sorted(unknown)}"


def test_legends_name_labels_the_query_keeps() -> None:
    """``{{label}}`` in a legend must survive the query's top-level aggregation."""
    for panel, target in targets(load_dashboard()):
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        grouped = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", target["expr"])
        if legend and grouped:
            kept = {label.strip() for label in grouped.group(1).split(",")}
            assert legend <= kept, f"{panel['title']!r}: legend uses {sorted(legend - kept)}"


def test_template_variables_read_existing_labels() -> None:
    series = gateway_series()
    for variable in load_dashboard()["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["name"]
        metric, label = match.groups()
        assert label in series.get(metric, set()), f"{metric} has no label {label}"


# -- the rules use real series too -----------------------------------------------------------


def test_rules_use_only_existing_series() -> None:
    known = known_series()
    for path in RULES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                unknown = metric_names(rule["expr"]) - known
                name = rule.get("record") or rule.get("alert")
                assert not unknown, f"{path.name}: {name} uses unknown series {sorted(unknown)}"

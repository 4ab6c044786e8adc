"""Prometheus config, recording rules and alerts, checked with the real promtool.

promtool comes from Debian's ``prometheus`` package (launch/test.sh installs it). These tests
fail rather than skip without it: a skipped rules test would let a broken alert ship.
"""

from __future__ import annotations

import glob
import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))


def run(promtool: str, *args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules_of(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def gen_sla_rules() -> ModuleType:
    """deploy/gen_sla_rules.py, imported by path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_sla_rules", ROOT / "deploy/gen_sla_rules.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- promtool ------------------------------------------------------------------------------


def test_prometheus_config_is_valid(promtool: str) -> None:
    run(promtool, "check", "config", str(PROM / "prometheus.yml"))


def test_prometheus_loads_every_rule_file() -> None:
    config = load_yaml(PROM / "prometheus.yml")
    loaded = {Path(p) for g in config["rule_files"] for p in glob.glob(str(PROM / g))}
    assert loaded == set(RULES)
    assert {p.name for p in RULES} >= {"recording.yml", "alerts.yml", "sla.yml"}


@pytest.mark.parametrize("rule_file", RULES, ids=lambda p: p.name)
def test_rule_file_is_valid(promtool: str, rule_file: Path) -> None:
    run(promtool, "check", "rules", str(rule_file))


def test_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS, "no rule unit tests under deploy/prometheus/tests/"
    run(promtool, "test", "rules", *(p.name for p in RULE_TESTS), cwd=PROM / "tests")


# -- coverage of the rule unit tests ---------------------------------------------------------


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert must fire on some synthetic series and stay quiet on some others."""
    alerts = {r["alert"] for r in rules_of(PROM / "rules/alerts.yml") if "alert" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "alerts.yml defines no alerts"
    assert alerts - fired == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (fired | quiet) <= alerts, "tests name alerts that do not exist"


def test_rule_unit_tests_load_every_rule_file() -> None:
    for path in RULE_TESTS:
        loaded = {(path.parent / f).resolve() for f in load_yaml(path)["rule_files"]}
        assert loaded == {p.resolve() for p in RULES}, path.name


def groups_read(groups: list[dict[str, Any]]) -> dict[str, set[str]]:
    """For each rule group, the other groups whose recorded series its expressions read."""
    owner = {r["record"]: g["name"] for g in groups for r in g["rules"] if "record" in r}
    return {
        g["name"]: {
            owner[name]
            for r in g["rules"]
            for name in owner
            if owner[name] != g["name"] and re.search(re.escape(name) + r"(?![\w:])", r["expr"])
        }
        for g in groups
    }


def test_rule_unit_tests_evaluate_a_group_after_the_groups_it_reads() -> None:
    """Without ``group_eval_order`` promtool evaluates a test's rule groups in random order
    (Go map order), so an alert on a recorded series sees it one interval late in some runs:
    a CI run failed ``GatewayCapacityShort`` at its 15-minute mark that way (4 of 40 runs of
    promtool here)."""
    for path in RULE_TESTS:
        test = load_yaml(path)
        groups = [
            g for f in test["rule_files"] for g in load_yaml((path.parent / f).resolve())["groups"]
        ]
        order = test.get("group_eval_order")
        assert order is not None, f"{path.name} sets no group_eval_order"
        assert sorted(order) == sorted(g["name"] for g in groups), path.name
        for group, read in groups_read(groups).items():
            for earlier in read:
                assert order.index(earlier) < order.index(group), (path.name, earlier, group)


def test_alerts_use_only_recorded_or_known_series() -> None:
    recorded = {r["record"] for p in RULES for r in rules_of(p) if "record" in r}
    expressions = " ".join(r["expr"] for r in rules_of(PROM / "rules/alerts.yml"))
    for name in (
        "task:gateway_request_duration_seconds:p95_5m",
        "task:gateway_time_to_first_token_seconds:p95_5m",
        "gateway:sla_latency_seconds",
        "gateway:sla_ttft_seconds",
        "task:gateway_request_errors:ratio_rate5m",
        "priority_class:gateway_queue_wait_seconds:p95_5m",
        "priority_class:gateway_rejections:rate5m",
    ):
        assert name in recorded, name
        assert name in expressions, name


# -- the generated SLA rules -----------------------------------------------------------------


def test_sla_rules_are_generated_from_the_shipped_task_table() -> None:
    gen = gen_sla_rules()
    expected = gen.render(load_config(ROOT / "gateway/tasks.toml"), "gateway/tasks.toml")
    actual = (PROM / "rules/sla.yml").read_text(encoding="utf-8")
    assert actual == expected, "sla.yml is stale: run `python deploy/gen_sla_rules.py`"


def test_sla_rules_hold_every_task_threshold() -> None:
    config = load_config(ROOT / "gateway/tasks.toml")
    values: dict[tuple[str, str], float] = {}
    for rule in rules_of(PROM / "rules/sla.yml"):
        number = re.fullmatch(r"vector\(([0-9.e+-]+)\)", rule["expr"])
        assert number, rule["expr"]
        values[rule["record"], rule["labels"]["task"]] = float(number.group(1))
    assert values == {
        **{("gateway:sla_latency_seconds", t.name): t.sla_latency_s for t in config.tasks.values()},
        **{("gateway:sla_ttft_seconds", t.name): t.sla_ttft_s for t in config.tasks.values()},
    }


def test_sla_generator_follows_a_custom_task_table(promtool: str, tmp_path: Path) -> None:
    table = tmp_path / "tasks.toml"
    table.write_text(
        '[tasks.triage]\nclass = "realtime"\nsla_latency_s = 0.75\nsla_ttft_s = 0.5\n'
        '[tasks."odd \\"name\\""]\nclass = "batch"\ndeadline_s = 900\n',
        encoding="utf-8",
    )
    out = tmp_path / "sla.yml"
    gen = gen_sla_rules()
    assert gen.main(["--tasks", str(table), "--out", str(out)]) == 0
    run(promtool, "check", "rules", str(out))
    values = {(r["record"], r["labels"]["task"]): r["expr"] for r in rules_of(out)}
    assert values == {
        ("gateway:sla_latency_seconds", "triage"): "vector(0.75)",
        ("gateway:sla_ttft_seconds", "triage"): "vector(0.5)",
        # Without SLA fields a task's SLA is its deadline (gateway.config's default).
        ("gateway:sla_latency_seconds", 'odd "name"'): "vector(900)",
        ("gateway:sla_ttft_seconds", 'odd "name"'): "vector(900)",
    }
    assert gen.main(["--tasks", str(table), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    assert gen.main(["--tasks", str(table), "--out", str(out), "--check"]) == 1


def test_sla_generator_refuses_an_invalid_task_table(tmp_path: Path) -> None:
    table = tmp_path / "tasks.toml"
    table.write_text('[tasks.t]\nclass = "urgent"\n', encoding="utf-8")
    out = tmp_path / "sla.yml"
    assert gen_sla_rules().main(["--tasks", str(table), "--out", str(out)]) == 2
    assert not out.exists()

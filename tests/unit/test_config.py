from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config, parse_config


def minimal(**task: Any) -> dict[str, Any]:
    return {"tasks": {"t": {"class": "standard", **task}}}


def test_shipped_table_has_the_documented_tasks_and_classes() -> None:
    config = load_config()
    assert set(config.tasks) == {
        "sentiment",
        "chat",
        "code",
        "summarize",
        "translate",
        "batch",
        "assist",
    }
    assert config.tasks["sentiment"].priority_class == "realtime"
    assert config.tasks["sentiment"].labels == ("positive", "negative")
    assert {config.tasks[t].priority_class for t in ("chat", "code")} == {"interactive"}
    assert {config.tasks[t].priority_class for t in ("summarize", "translate")} == {"standard"}
    assert config.tasks["batch"].priority_class == "batch"
    assert config.tasks["assist"].pipeline is not None
    # Streams that cannot start within their SLA are refused, not served late.
    assert not any(task.serve_late for task in config.tasks.values())
    # The documented bounds: each class outranks any new arrival within its SLA's first-token
    # time (batch: 90 s of 120 s); background, which no shipped task uses, after 100 s.
    gap = {p.name: config.classes.top_head_start_s - p.head_start_s for p in config.classes.ordered}
    assert gap == {"realtime": 0, "interactive": 10, "standard": 20, "batch": 90, "background": 100}
    assert (
        gap["batch"] + config.tasks["sentiment"].queue_deadline_s < config.tasks["batch"].sla_ttft_s
    )


def test_labels_are_configurable_in_any_language(tmp_path: Path) -> None:
    table = tmp_path / "tasks.toml"
    table.write_text(
        '[tasks.sentiment]\nclass = "realtime"\nlabels = ["正面", "负面"]\n', encoding="utf-8"
    )
    assert load_config(table).tasks["sentiment"].labels == ("正面", "负面")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (minimal(deadline_s="5"), "tasks.t.deadline_s must be float"),
        (minimal(deadline_s=True), "tasks.t.deadline_s must be float"),
        (minimal(clas="batch"), "unknown key 'tasks.t.clas'"),
        (minimal(**{"class": "urgent"}), "tasks.t.class 'urgent' is not one of"),
        (minimal(labels=["only"]), "at least two"),
        (minimal(max_tokens=0), "tasks.t.max_tokens must be positive"),
        (minimal(max_tokens=100, max_tokens_limit=10), "is below max_tokens"),
        (minimal(queue_deadline_s=10, deadline_s=5), "exceeds deadline_s"),
        (minimal(temperature=3.0), "temperature must be in [0, 2]"),
        (minimal(degrade={"when_wait_s": 1}), "tasks.t.degrade.max_tokens is required"),
        ({"tasks": {}}, "defines no tasks"),
        ({"tasks": {"t": {}}, "classes": {"urgent": {}}}, "unknown priority class 'urgent'"),
        (
            {"tasks": {"t": {}}, "classes": {"batch": {"head_start_s": 99}}},
            "head_start_s must not increase",
        ),
        (
            {"tasks": {"t": {}}, "classes": {"realtime": {"reserve": 0.5}}},
            "reserve must not decrease",
        ),
        ({"tasks": {"t": {}}, "classes": {"batch": {"reserve": 1.0}}}, "reserve must be in [0, 1)"),
        (
            {"tasks": {"t": {}}, "classes": {"batch": {"max_wait_s": 0}}},
            "classes.batch.max_wait_s must be positive",
        ),
        ({"tasks": {"t": {}}, "fairness": {"mode": "tenants"}}, "fairness.mode must be one of"),
        ({"tasks": {"t": {"serve_late": "yes"}}}, "tasks.t.serve_late"),
        ({"tasks": {"t": {}}, "fairness": {"input_weight": -1}}, "fairness.input_weight"),
        (
            {"tasks": {"t": {}}, "fairness": {"input_weight": 0, "output_weight": 0}},
            "cannot both be 0",
        ),
        ({"tasks": {"t": {}}, "fairness": {"weight": 2}}, "unknown key 'fairness.weight'"),
        (
            {
                "tasks": {
                    "a": {
                        "pipeline": {
                            "label_task": "a",
                            "reply_task": "a",
                            "reply_prompt": "{label}",
                        }
                    }
                }
            },
            "label_task must name a task with labels",
        ),
    ],
)
def test_invalid_tables_are_refused_with_the_key_named(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in str(info.value)


def test_fairness_is_by_tokens_unless_the_table_says_otherwise() -> None:
    shipped = load_config().fairness
    assert (shipped.mode, shipped.input_weight, shipped.output_weight) == ("tokens", 1.0, 2.0)
    assert parse_config(minimal()).fairness == shipped
    rr = parse_config({**minimal(), "fairness": {"mode": "requests", "output_weight": 3}})
    assert (rr.fairness.mode, rr.fairness.output_weight) == ("requests", 3.0)


def test_unreadable_or_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tasks\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_class_overrides_keep_defaults_for_the_rest() -> None:
    config = parse_config({"tasks": {"t": {}}, "classes": {"batch": {"max_queued": 5}}})
    assert config.classes["batch"].max_queued == 5
    assert config.classes["batch"].head_start_s == 10.0
    assert config.classes["realtime"].max_queued == 64


def test_max_wait_defaults_to_the_gap_to_the_class_above() -> None:
    config = parse_config(
        {
            "tasks": {"t": {}},
            "classes": {
                "standard": {"head_start_s": 85},
                "batch": {"head_start_s": 85},
                "background": {"max_wait_s": 90},
            },
        }
    )
    waits = {p.name: p.max_wait_s for p in config.classes.ordered}
    assert waits == {
        "realtime": math.inf,  # nothing above it
        "interactive": 10.0,
        "standard": 5.0,
        "batch": math.inf,  # no gap: batch never outranks standard's fresh work
        "background": 90.0,  # as configured
    }


def test_the_sla_first_table_differs_from_the_shipped_one_only_as_documented() -> None:
    """loadtest/tasks-tuned.toml is what the SLO benchmark's configuration (d) measured."""
    shipped = load_config(None)
    tuned = load_config(Path(__file__).parents[2] / "loadtest" / "tasks-tuned.toml")
    changed_classes = {
        p.name: (p.reserve, p.max_wait_s)
        for p, q in zip(tuned.classes.ordered, shipped.classes.ordered, strict=True)
        if p != q
    }
    assert changed_classes == {
        "standard": (0.25, 3.0),
        "batch": (0.5, 3.0),
        "background": (0.6, 3.0),
    }
    changed_tasks = {
        name: task.queue_deadline_s
        for name, task in tuned.tasks.items()
        if task != shipped.tasks[name]
    }
    assert changed_tasks == {"chat": 2.5, "code": 2.5}
    assert tuned.tasks.keys() == shipped.tasks.keys()


def test_a_reply_prompt_with_another_placeholder_is_refused_at_load(tmp_path: Path) -> None:
    """It would raise on every assist request; say so when the table is loaded instead."""
    table = tmp_path / "tasks.toml"
    shipped = (Path(__file__).resolve().parents[2] / "gateway" / "tasks.toml").read_text()
    table.write_text(shipped.replace("Reply in a way that fits", "Use a {tone} tone that fits"))
    with pytest.raises(ConfigError, match="only \\{label\\}"):
        load_config(table)
    table.write_text(shipped.replace("Reply in a way", "Reply {{in braces}} in a way"))
    assert load_config(table).tasks["assist"].pipeline is not None

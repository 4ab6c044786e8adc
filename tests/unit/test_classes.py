from __future__ import annotations

import pytest

from gateway.classes import (
    CLASS_NAMES,
    DEFAULT_POLICIES,
    ClassTable,
    effective_priority,
    to_vllm_priority,
)

CLASSES = ClassTable(DEFAULT_POLICIES)


def test_classes_are_ordered_most_important_first() -> None:
    assert CLASSES.names() == CLASS_NAMES
    heads = [CLASSES[n].head_start_s for n in CLASS_NAMES]
    assert heads == sorted(heads, reverse=True)


def test_vllm_priority_runs_more_important_work_first() -> None:
    """vLLM serves LOWER values first; our scale says higher is more important."""
    values = [to_vllm_priority(effective_priority(CLASSES[n], 0.0)) for n in CLASS_NAMES]
    assert values == sorted(values)
    assert to_vllm_priority(effective_priority(CLASSES["realtime"], 0.0)) == -100
    assert to_vllm_priority(effective_priority(CLASSES["background"], 0.0)) == 0


def test_waiting_raises_effective_priority_one_point_per_second() -> None:
    batch = CLASSES["batch"]
    assert effective_priority(batch, 12.0) == batch.head_start_s + 12.0
    assert to_vllm_priority(effective_priority(batch, 12.0)) < to_vllm_priority(
        effective_priority(batch, 0.0)
    )


@pytest.mark.parametrize(
    ("base", "requested", "expected"),
    [
        ("realtime", None, "realtime"),
        ("realtime", "batch", "batch"),  # lowering is allowed
        ("batch", "realtime", "batch"),  # raising is not
        ("interactive", "interactive", "interactive"),
    ],
)
def test_a_caller_may_lower_its_class_never_raise_it(
    base: str, requested: str | None, expected: str
) -> None:
    assert CLASSES.lowered(CLASSES[base], requested).name == expected


def test_unknown_class_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        CLASSES.lowered(CLASSES["batch"], "urgent")

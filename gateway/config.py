"""The task table: what each task means, parsed and validated from TOML.

This is the reloadable half of the configuration (SIGHUP swaps it whole); process settings
that cannot change while running live in :mod:`gateway.settings`. Parsing is strict: an
unknown key or a wrong type is an error naming the offending key, because a typo in a
deadline silently falling back to a default is worse than a refused reload.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from gateway.classes import CLASS_NAMES, DEFAULT_POLICIES, ClassPolicy, ClassTable
from gateway.fairness import MODES, FairnessPolicy

T = TypeVar("T")


class ConfigError(ValueError):
    """The task table is invalid; the message names the key and what is wrong."""


@dataclass(frozen=True, slots=True)
class Degrade:
    """Overload policy: above ``when_wait_s`` of predicted queue wait, cap ``max_tokens``."""

    when_wait_s: float
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A two-step task: label the input with ``label_task``, then reply with ``reply_task``.

    ``reply_prompt`` is appended to the reply task's system prompt with ``{label}`` filled in.
    """

    label_task: str
    reply_task: str
    reply_prompt: str


@dataclass(frozen=True, slots=True)
class Task:
    """One named job the model does. Clients select it with ``model=<name>``."""

    name: str
    description: str
    priority_class: str
    system_prompt: str
    labels: tuple[str, ...] | None
    max_tokens: int
    max_tokens_limit: int
    temperature: float
    queue_deadline_s: float
    deadline_s: float
    max_input_tokens: int
    truncate_input: bool
    sla_latency_s: float
    sla_ttft_s: float
    degrade: Degrade | None = None
    pipeline: Pipeline | None = None
    #: Accepts function calling (``tools``, ``tool_choice``, ``parallel_tool_calls``).
    tools: bool = False
    #: A streamed request that can no longer get its first token within ``sla_ttft_s`` is
    #: still served (last, while its queue deadline allows) instead of refused with 429.
    serve_late: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the task table file holds."""

    classes: ClassTable
    max_queued: int
    tasks: Mapping[str, Task]
    fairness: FairnessPolicy = field(default_factory=FairnessPolicy)

    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)


def default_config_path() -> Path:
    """The task table shipped with the package."""
    return Path(str(resources.files("gateway").joinpath("tasks.toml")))


def load_config(path: Path | None = None) -> Config:
    """Read and validate a task table; ``None`` means the shipped defaults."""
    path = path or default_config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read task table {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    _no_unknown_keys(raw, {"classes", "queue", "tasks", "fairness"}, "")
    classes = _parse_classes(_table(raw, "classes", ""))
    queue = _table(raw, "queue", "")
    _no_unknown_keys(queue, {"max_queued"}, "queue")
    max_queued = _positive(_get(queue, "max_queued", int, 512, "queue"), "queue.max_queued")
    tasks_raw = _table(raw, "tasks", "")
    if not tasks_raw:
        raise ConfigError("the task table defines no tasks")
    tasks = {name: _parse_task(name, body, classes) for name, body in tasks_raw.items()}
    _check_pipelines(tasks)
    fairness = _fairness(_table(raw, "fairness", ""))
    return Config(classes=classes, max_queued=max_queued, tasks=tasks, fairness=fairness)


def _fairness(raw: Mapping[str, Any]) -> FairnessPolicy:
    """``[fairness]``: how tenants of one class share the model (see gateway.fairness)."""
    _no_unknown_keys(raw, {"mode", "input_weight", "output_weight"}, "fairness")
    default = FairnessPolicy()
    mode = _get(raw, "mode", str, default.mode, "fairness")
    if mode not in MODES:
        raise ConfigError(f"fairness.mode must be one of {', '.join(MODES)}, got {mode!r}")
    weights = {
        key: _non_negative(
            _get(raw, key, float, getattr(default, key), "fairness"), f"fairness.{key}"
        )
        for key in ("input_weight", "output_weight")
    }
    if not any(weights.values()):
        raise ConfigError("fairness: input_weight and output_weight cannot both be 0")
    return FairnessPolicy(mode, weights["input_weight"], weights["output_weight"])


def _parse_classes(raw: Mapping[str, Any]) -> ClassTable:
    unknown = set(raw) - set(CLASS_NAMES)
    if unknown:
        raise ConfigError(
            f"unknown priority class {sorted(unknown)[0]!r}; classes are {', '.join(CLASS_NAMES)}"
        )
    policies = []
    max_waits: list[float | None] = []
    for default in DEFAULT_POLICIES:
        path = f"classes.{default.name}"
        body = _table(raw, default.name, "classes")
        _no_unknown_keys(
            body, {"head_start_s", "reserve", "max_queued", "max_wait_s", "max_preemptions"}, path
        )
        max_wait = body.get("max_wait_s")
        if max_wait is not None:
            max_wait = _positive(_require(body, "max_wait_s", float, path), f"{path}.max_wait_s")
        max_waits.append(max_wait)
        reserve = _get(body, "reserve", float, default.reserve, path)
        if not 0.0 <= reserve < 1.0:
            raise ConfigError(f"{path}.reserve must be in [0, 1), got {reserve}")
        policies.append(
            ClassPolicy(
                name=default.name,
                rank=default.rank,
                head_start_s=_non_negative(
                    _get(body, "head_start_s", float, default.head_start_s, path),
                    f"{path}.head_start_s",
                ),
                reserve=reserve,
                max_queued=_positive(
                    _get(body, "max_queued", int, default.max_queued, path), f"{path}.max_queued"
                ),
                max_preemptions=int(
                    _non_negative(
                        _get(body, "max_preemptions", int, default.max_preemptions, path),
                        f"{path}.max_preemptions",
                    )
                ),
            )
        )
    ordered = [p.head_start_s for p in policies]
    if ordered != sorted(ordered, reverse=True):
        # A less important class starting ahead of a more important one inverts the classes.
        raise ConfigError("head_start_s must not increase from realtime down to background")
    reserves = [p.reserve for p in policies]
    if reserves != sorted(reserves):
        # Headroom is kept for MORE important classes; a less important class with less
        # reserve would be dispatched where a more important one may not go.
        raise ConfigError("reserve must not decrease from realtime down to background")
    # By default a class may fall behind by its gap to the class above: from then on its
    # requests would outrank that class's fresh ones. No gap (or the top class): no limit.
    above = [math.inf] + [p.head_start_s for p in policies[:-1]]
    for i, (policy, wait) in enumerate(zip(policies, max_waits, strict=True)):
        if wait is None:
            gap = above[i] - policy.head_start_s
            wait = gap if 0 < gap < math.inf else math.inf
        policies[i] = replace(policy, max_wait_s=wait)
    return ClassTable(policies)


_TASK_KEYS = {
    "description", "class", "system_prompt", "labels", "max_tokens", "max_tokens_limit",
    "temperature", "queue_deadline_s", "deadline_s", "max_input_tokens", "truncate_input",
    "sla_latency_s", "sla_ttft_s", "degrade", "pipeline", "tools", "serve_late",
}  # fmt: skip


def _parse_task(name: str, body: Any, classes: ClassTable) -> Task:
    path = f"tasks.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{path} must be a table")
    _no_unknown_keys(body, _TASK_KEYS, path)
    pclass = _get(body, "class", str, "standard", path)
    if pclass not in classes:
        raise ConfigError(f"{path}.class {pclass!r} is not one of {', '.join(classes.names())}")
    labels = _labels(body.get("labels"), path)
    max_tokens = _positive(_get(body, "max_tokens", int, 256, path), f"{path}.max_tokens")
    limit = _positive(
        _get(body, "max_tokens_limit", int, max_tokens, path), f"{path}.max_tokens_limit"
    )
    if limit < max_tokens:
        raise ConfigError(f"{path}.max_tokens_limit ({limit}) is below max_tokens ({max_tokens})")
    temperature = _get(body, "temperature", float, 0.7, path)
    if not 0.0 <= temperature <= 2.0:
        raise ConfigError(f"{path}.temperature must be in [0, 2], got {temperature}")
    deadline = _positive(_get(body, "deadline_s", float, 60.0, path), f"{path}.deadline_s")
    queue_deadline = _positive(
        _get(body, "queue_deadline_s", float, deadline, path), f"{path}.queue_deadline_s"
    )
    if queue_deadline > deadline:
        raise ConfigError(
            f"{path}.queue_deadline_s ({queue_deadline}) exceeds deadline_s ({deadline})"
        )
    tools = _get(body, "tools", bool, False, path)
    if tools and (labels is not None or body.get("pipeline") is not None):
        # A label task's answer is fixed to its labels; a pipeline's reply is built by it.
        raise ConfigError(f"{path}.tools: a task with labels or a pipeline cannot take tools")
    return Task(
        name=name,
        description=_get(body, "description", str, "", path),
        priority_class=pclass,
        system_prompt=_get(body, "system_prompt", str, "", path),
        labels=labels,
        max_tokens=max_tokens,
        max_tokens_limit=limit,
        temperature=temperature,
        queue_deadline_s=queue_deadline,
        deadline_s=deadline,
        max_input_tokens=_positive(
            _get(body, "max_input_tokens", int, 3072, path), f"{path}.max_input_tokens"
        ),
        truncate_input=_get(body, "truncate_input", bool, False, path),
        sla_latency_s=_positive(
            _get(body, "sla_latency_s", float, deadline, path), f"{path}.sla_latency_s"
        ),
        sla_ttft_s=_positive(_get(body, "sla_ttft_s", float, deadline, path), f"{path}.sla_ttft_s"),
        degrade=_degrade(body.get("degrade"), path),
        pipeline=_pipeline(body.get("pipeline"), path),
        tools=tools,
        serve_late=_get(body, "serve_late", bool, False, path),
    )


def _labels(raw: Any, path: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(x, str) and x for x in raw):
        raise ConfigError(f"{path}.labels must be a list of at least two non-empty strings")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{path}.labels has duplicates")
    return tuple(raw)


def _degrade(raw: Any, path: str) -> Degrade | None:
    if raw is None:
        return None
    path = f"{path}.degrade"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must be a table")
    _no_unknown_keys(raw, {"when_wait_s", "max_tokens"}, path)
    return Degrade(
        when_wait_s=_non_negative(_require(raw, "when_wait_s", float, path), f"{path}.when_wait_s"),
        max_tokens=_positive(_require(raw, "max_tokens", int, path), f"{path}.max_tokens"),
    )


def _pipeline(raw: Any, path: str) -> Pipeline | None:
    if raw is None:
        return None
    path = f"{path}.pipeline"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must be a table")
    _no_unknown_keys(raw, {"label_task", "reply_task", "reply_prompt"}, path)
    prompt = _require(raw, "reply_prompt", str, path)
    if "{label}" not in prompt:
        raise ConfigError(f"{path}.reply_prompt must contain {{label}}")
    try:
        # Any other {field} (or a stray brace) would fail on every request; write a literal
        # brace as {{ or }}.
        prompt.format(label="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{path}.reply_prompt may use only {{label}} ({exc!r}); "
            "write literal braces as {{ and }}"
        ) from None
    return Pipeline(
        label_task=_require(raw, "label_task", str, path),
        reply_task=_require(raw, "reply_task", str, path),
        reply_prompt=prompt,
    )


def _check_pipelines(tasks: Mapping[str, Task]) -> None:
    for task in tasks.values():
        if task.pipeline is None:
            continue
        label, reply = tasks.get(task.pipeline.label_task), tasks.get(task.pipeline.reply_task)
        where = f"tasks.{task.name}.pipeline"
        if label is None or label.labels is None or label.pipeline is not None:
            raise ConfigError(f"{where}.label_task must name a task with labels")
        if reply is None or reply.labels is not None or reply.pipeline is not None:
            raise ConfigError(f"{where}.reply_task must name a plain (unlabelled) task")


# -- typed access with errors that name the key ------------------------------------------


def _table(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_join(path, key)} must be a table")
    return value


def _get(raw: Mapping[str, Any], key: str, kind: type[T], default: T, path: str) -> T:
    return _require(raw, key, kind, path) if key in raw else default


def _require(raw: Mapping[str, Any], key: str, kind: type[T], path: str) -> T:
    if key not in raw:
        raise ConfigError(f"{_join(path, key)} is required")
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML writes 2 for 2.0; accept it for seconds and ratios
    # bool is an int subclass in Python; a deadline of `true` is a typo, not 1 second.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{_join(path, key)} must be {kind.__name__}, got {value!r}")
    return value


def _positive(value: T, name: str) -> T:
    if not value > 0:  # type: ignore[operator]
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _non_negative(value: float, name: str) -> float:
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _no_unknown_keys(raw: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {_join(path, unknown[0])!r}; allowed: {', '.join(sorted(allowed))}"
        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key

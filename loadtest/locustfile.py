"""Locust users for the gateway's OpenAI API (or vLLM directly), one request per task pick.

    # through the gateway: the task is the model name
    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 \\
        --mix sentiment=5,chat=3,summarize=1,batch=1 \\
        --headless -u 8 -r 8 -t 2m --csv test-output/locust --html test-output/locust.html

    # vLLM directly, the body the gateway would build, static priority from the class
    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --target vllm --priority class ...

Each user loops: pick a task by the mix's weights, send one request (streamed for the tasks
the workload streams: chat, code, summarize, batch), wait ``--think-time`` on average. What
Locust records, by request type and name:

    POST <task>              the whole request; failures name the HTTP status and the
                             error code ("429 rate_limit_error queue_full (Retry-After)",
                             "504 timeout_error deadline_exceeded", in-band stream errors)
    TTFT <task>              streams only: send to the first chunk (a custom metric)
    SLA breach <task> ...    a complete answer outside the task's sla_latency_s or, for a
                             stream, sla_ttft_s (from gateway/tasks.toml): always a failure

So ``--exit-code-on-error`` (on by default) fails a headless run on any error or breach.
Options can also come from the environment: LOCUST_MIX, LOCUST_TARGET, LOCUST_PRIORITY,
LOCUST_THINK_TIME, LOCUST_API_KEY, LOCUST_TASKS_TOML.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from locust import User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # locust imports this file by path: make `loadtest.*` importable
    sys.path.insert(0, str(ROOT))

from gateway.config import Config, Task, load_config  # noqa: E402
from loadtest.workload import (  # noqa: E402
    LOADS,
    PriorityMode,
    client_body,
    parse_mix,
    vllm_body,
)

DEFAULT_MIX = "sentiment=5,chat=3,summarize=1,batch=1"
CHAT_PATH = "/v1/chat/completions"


def _add_arguments(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("qwen-gateway workload")
    group.add_argument(
        "--mix", env_var="LOCUST_MIX", default=DEFAULT_MIX,
        help=f"task weights, e.g. {DEFAULT_MIX}; tasks: {', '.join(LOADS)}",
    )  # fmt: skip
    group.add_argument(
        "--target", env_var="LOCUST_TARGET", choices=("gateway", "vllm"), default="gateway",
        help="gateway: model = task name; vllm: the body the gateway would build",
    )  # fmt: skip
    group.add_argument(
        "--priority", env_var="LOCUST_PRIORITY", choices=("class", "fcfs"), default="class",
        help="--target vllm only: class = static vLLM priority from the task's class, fcfs = 0",
    )  # fmt: skip
    group.add_argument(
        "--think-time", env_var="LOCUST_THINK_TIME", type=float, default=0.5,
        help="mean seconds a user waits between requests (uniform 0..2x)",
    )  # fmt: skip
    group.add_argument(
        "--api-key", env_var="LOCUST_API_KEY", default="",
        help="sent as 'Authorization: Bearer ...' (a gateway with API keys needs one)",
    )  # fmt: skip
    group.add_argument(
        "--tasks-toml", env_var="LOCUST_TASKS_TOML", default="",
        help="task table for SLAs and request building (default: the shipped one)",
    )  # fmt: skip


def _check_options(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    try:
        mix = parse_mix(opts.mix)  # a bad mix fails at start, not in every user
    except ValueError as exc:
        sys.exit(f"--mix: {exc}")
    if opts.target == "vllm" and "assist" in mix:
        sys.exit("--mix: assist is a two-step gateway pipeline; it cannot target vLLM directly")


# Registered by call, not as decorators: locust's add_listener is untyped.
events.init_command_line_parser.add_listener(_add_arguments)  # type: ignore[no-untyped-call]
events.init.add_listener(_check_options)  # type: ignore[no-untyped-call]


class SlaBreach(Exception):
    """A complete answer that came later than the task's SLA allows."""


class RequestFailed(Exception):
    """An explicit error (HTTP status or in-band event) or an answer that is not one."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request produced; ``error`` set means a failure with that (bounded) message."""

    latency_s: float
    ttft_s: float | None
    length: int
    error: str | None = None


class OpenAIUser(User):
    """Sends the workload's OpenAI chat requests; see the module docstring for the metrics."""

    host = "http://127.0.0.1:8080"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        assert opts is not None, "run through the locust command line"
        self.mix = parse_mix(opts.mix)
        self.target: str = opts.target
        self.priority: PriorityMode = opts.priority
        self.think_time_s: float = opts.think_time
        self.config: Config = load_config(Path(opts.tasks_toml) if opts.tasks_toml else None)
        self.rng = random.Random()
        self.session = requests.Session()
        if opts.api_key:
            self.session.headers["Authorization"] = f"Bearer {opts.api_key}"
        self.base = (self.host or "").rstrip("/")
        self.model = self._vllm_model() if self.target == "vllm" else ""

    def on_stop(self) -> None:
        self.session.close()

    def wait_time(self) -> float:
        return self.rng.uniform(0, 2 * self.think_time_s)

    @task
    def one_request(self) -> None:
        name = self.rng.choices(list(self.mix), list(self.mix.values()))[0]
        load = LOADS[name]
        body = client_body(load, self.rng.choice(load.prompts), self.rng.randrange(2**31))
        if self.target == "vllm":
            body = vllm_body(self.config, body, self.model, self.priority)
        spec = self.config.tasks[name]
        outcome = self._send(body, spec, stream=load.stream)
        self._report(name, spec, outcome, stream=load.stream)

    # -- one request ---------------------------------------------------------------

    def _send(self, body: dict[str, Any], spec: Task, *, stream: bool) -> Outcome:
        started = time.perf_counter()
        try:
            with self.session.post(
                self.base + CHAT_PATH, json=body, stream=stream, timeout=spec.deadline_s + 30
            ) as response:
                if response.status_code != 200:
                    return Outcome(_since(started), None, len(response.content), _http(response))
                if stream:
                    return _read_stream(response, started)
                return _read_json(response, started, spec)
        except requests.RequestException as exc:
            return Outcome(_since(started), None, 0, f"transport {type(exc).__name__}")

    def _report(self, name: str, spec: Task, outcome: Outcome, *, stream: bool) -> None:
        fire = self.environment.events.request.fire
        fire(
            request_type="POST",
            name=name,
            response_time=outcome.latency_s * 1000,
            response_length=outcome.length,
            exception=RequestFailed(outcome.error) if outcome.error else None,
            context={"task": name},
        )
        if outcome.error:
            return  # a failed request is already a failure; no SLA verdict on top
        if stream and outcome.ttft_s is not None:
            fire(
                request_type="TTFT",
                name=name,
                response_time=outcome.ttft_s * 1000,
                response_length=0,
                exception=None,
                context={"task": name},
            )
        breaches = []
        if outcome.latency_s > spec.sla_latency_s:
            breaches.append(("latency", outcome.latency_s, spec.sla_latency_s))
        if stream and outcome.ttft_s is not None and outcome.ttft_s > spec.sla_ttft_s:
            breaches.append(("ttft", outcome.ttft_s, spec.sla_ttft_s))
        for what, value, limit in breaches:
            fire(
                request_type="SLA breach",
                name=f"{name} {what}",
                response_time=value * 1000,
                response_length=0,
                exception=SlaBreach(f"{what} over the {limit:g} s SLA"),
                context={"task": name},
            )

    def _vllm_model(self) -> str:
        """vLLM's own model id (it must be named in the body when talking to vLLM directly)."""
        response = self.session.get(self.base + "/v1/models", timeout=30)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


def _since(started: float) -> float:
    return time.perf_counter() - started


def _http(response: requests.Response) -> str:
    """``"429 rate_limit_error queue_full (Retry-After)"``: status, type, code; bounded."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    parts = [str(response.status_code)]
    if isinstance(error, dict):
        parts += [str(error.get(k)) for k in ("type", "code") if error.get(k)]
    else:
        parts.append("(no OpenAI error envelope)")
    if "Retry-After" in response.headers:
        parts.append("(Retry-After)")
    return " ".join(parts)


def _read_stream(response: requests.Response, started: float) -> Outcome:
    ttft: float | None = None
    length = 0
    error: str | None = None
    for line in response.iter_lines(chunk_size=1024):
        length += len(line)
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return Outcome(_since(started), ttft, length, error)
        try:
            chunk = json.loads(data)
        except ValueError:
            return Outcome(_since(started), ttft, length, "unparsable stream event")
        if isinstance(chunk.get("error"), dict):
            e = chunk["error"]
            error = f"in-band {e.get('type')} {e.get('code')}"
        elif chunk.get("choices") and ttft is None:
            ttft = _since(started)
    return Outcome(_since(started), ttft, length, error or "stream ended without [DONE]")


def _read_json(response: requests.Response, started: float, spec: Task) -> Outcome:
    latency = _since(started)
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return Outcome(latency, None, len(response.content), "answer without a message")
    if spec.labels is not None and content not in spec.labels:
        return Outcome(latency, None, len(response.content), "answer is not one of the labels")
    return Outcome(latency, None, len(response.content))

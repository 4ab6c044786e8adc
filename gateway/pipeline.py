"""Two-step tasks such as ``assist``: label the input first, then reply knowing the label.

Both steps are ordinary calls of the serving path for the same request: same lifecycle (one
tenant slot held across both, one record), same tenant (fairness), and each at a class the
caller's key allows. The label step runs at the label task's class (``sentiment``:
realtime) lowered to the caller's ceiling and ``X-Priority``, so it is quick under load for
callers allowed that; the reply step runs at the pipeline task's class with the label written
into its system prompt. The label reaches the client twice: as the response field
``sentiment`` (in the first chunk of a stream) and as the ``X-Sentiment`` header
(percent-encoded UTF-8, so labels such as 正面 survive HTTP's Latin-1 headers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import quote

from gateway import sse
from gateway.classes import ClassPolicy
from gateway.config import Config, Task
from gateway.errors import BadGateway, BadRequest
from gateway.lifecycle import Lifecycle
from gateway.protocol import ClientRequest
from gateway.serving import Serving
from gateway.steps import Answer, Budget, Step, Stream

LABEL_FIELD = "sentiment"


async def assist(
    serving: Serving, life: Lifecycle, config: Config, step: Step, label_policy: ClassPolicy
) -> Answer | Stream:
    """Run the pipeline task ``step.task`` for the request; ``label_policy`` is the class its
    label step may use (the label task's, within the caller's limits)."""
    pipe = step.task.pipeline
    assert pipe is not None
    label = await _label(serving, life, config.tasks[pipe.label_task], step, label_policy)
    life.exchange.label = label
    life.release_ticket()  # the label step's slot; the reply queues anew
    reply = replace(
        step,
        task=_reply_task(config.tasks[pipe.reply_task], step.task),
        extra_system=pipe.reply_prompt.format(label=label),
        queued_at=serving.now(),  # its queue wait starts now, not at arrival
    )
    result = await serving.run(
        life, reply, first_event=lambda event: _event_with_label(event, label)
    )
    result.headers["X-Sentiment"] = quote(label, safe="")
    if isinstance(result, Answer):
        result.body[LABEL_FIELD] = label
    return result


async def _label(
    serving: Serving, life: Lifecycle, task: Task, step: Step, policy: ClassPolicy
) -> str:
    text = _last_user_text(step.request)
    label_step = Step(
        task=task,
        policy=policy,
        request=ClientRequest("chat", task.name, messages=[{"role": "user", "content": text}]),
        budget=Budget(task.queue_deadline_s, task.deadline_s).within(step.budget),
        tenant=step.tenant,
    )
    result = await serving.run(life, label_step)
    assert isinstance(result, Answer)  # the label step does not stream
    label = _answer_text(result.body).strip()
    if task.labels is not None and label not in task.labels:
        raise BadGateway(
            f"the label step answered {label!r}, not one of its labels", code="bad_label"
        )
    return label


def _reply_task(reply: Task, pipeline_task: Task) -> Task:
    """The reply task's prompt and limits, under the pipeline task's name and class."""
    return replace(reply, name=pipeline_task.name, priority_class=pipeline_task.priority_class)


def _last_user_text(req: ClientRequest) -> str:
    for message in reversed(req.messages):
        if message["role"] == "user" and message.get("content"):
            return str(message["content"])
    if req.endpoint == "completions" and req.prompt:
        return req.prompt
    raise BadRequest("assist needs a user message to label", param="messages", code="invalid_value")


def _answer_text(answer: dict[str, Any]) -> str:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BadGateway(
            "the label step's answer has no content", code="bad_upstream_response"
        ) from None
    return content if isinstance(content, str) else ""


def _event_with_label(event: bytes, label: str) -> bytes:
    chunk = sse.parse(event)
    if chunk is None:
        return event
    chunk[LABEL_FIELD] = label
    return sse.encode(chunk)

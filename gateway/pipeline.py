"""Two-step tasks such as ``assist``: label the input first, then reply knowing the label.

The label step runs at the label task's class (``sentiment``: realtime), so it is quick even
under load; the reply step runs at the pipeline task's class with the label written into its
system prompt. The label reaches the client twice: as the response field ``sentiment`` (in the
first chunk of a stream) and as the ``X-Sentiment`` header (percent-encoded UTF-8, so labels
such as 正面 survive HTTP's Latin-1 headers).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from starlette.responses import Response

from gateway import sse
from gateway.config import Config, Task
from gateway.errors import BadGateway, BadRequest
from gateway.exchange import Exchange, record
from gateway.protocol import ClientRequest
from gateway.proxy import Budget, Step, call_json, dispatch, fit, serve
from gateway.runtime import Runtime

LABEL_FIELD = "sentiment"


async def assist(
    rt: Runtime, ex: Exchange, config: Config, step: Step, headers: dict[str, str]
) -> Response:
    pipe = step.task.pipeline
    assert pipe is not None
    label_task = config.tasks[pipe.label_task]
    label = await _label(rt, ex, config, label_task, step)
    ex.label = label
    headers["X-Sentiment"] = quote(label, safe="")
    reply = Step(
        task=_reply_task(config.tasks[pipe.reply_task], step.task),
        policy=step.policy,
        request=step.request,
        budget=step.budget,  # one budget, from the original arrival, covers both steps
        extra_system=pipe.reply_prompt.format(label=label),
        queued_at=rt.dispatcher.now(),  # its queue wait starts now, not at arrival
    )
    return await serve(
        rt,
        ex,
        reply,
        headers,
        transform_json=lambda answer: _with_label(answer, label),
        transform_first_event=lambda event: _event_with_label(event, label),
    )


async def _label(rt: Runtime, parent: Exchange, config: Config, task: Task, step: Step) -> str:
    text = _last_user_text(step.request)
    label_ex = Exchange(
        request_id=parent.request_id,
        arrival=rt.dispatcher.now(),
        task=task.name,
        priority_class=task.priority_class,
    )
    label_step = Step(
        task=task,
        policy=config.classes[task.priority_class],
        request=ClientRequest("chat", task.name, messages=[{"role": "user", "content": text}]),
        budget=Budget(
            min(task.queue_deadline_s, step.budget.queue_s),
            min(task.deadline_s, step.budget.total_s),
        ),
    )
    try:
        label_step = await fit(rt, label_step, {})
        ticket = await dispatch(rt, label_ex, label_step)
        try:
            _, answer = await call_json(rt, label_ex, label_step, ticket, task.max_tokens)
        finally:
            rt.dispatcher.release(ticket)
        label = _content(answer).strip()
        if task.labels is not None and label not in task.labels:
            raise BadGateway(
                f"the label step answered {label!r}, not one of its labels", code="bad_label"
            )
        return label
    except Exception as exc:
        status = getattr(exc, "status", 500)
        label_ex.fail(
            status,
            "upstream_error" if status >= 500 else "client_error",
            getattr(exc, "code", None),
        )
        raise
    finally:
        record(label_ex, rt.metrics, rt.dispatcher.now(), log=rt.settings.access_log)


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


def _content(answer: dict[str, Any]) -> str:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BadGateway(
            "the label step's answer has no content", code="bad_upstream_response"
        ) from None
    return content if isinstance(content, str) else ""


def _with_label(answer: dict[str, Any], label: str) -> bytes:
    answer[LABEL_FIELD] = label
    return json.dumps(answer, ensure_ascii=False).encode()


def _event_with_label(event: bytes, label: str) -> bytes:
    chunk = sse.parse(event)
    if chunk is None:
        return event
    chunk[LABEL_FIELD] = label
    return sse.encode(chunk)

"""The OpenAI wire format: validate what clients send, build what vLLM gets.

Validation is an allowlist. Fields that change the answer are either forwarded (checked,
as vLLM means them) or refused with a 400 ``unsupported_parameter``; only metadata that
changes nothing (``user``, ``metadata``, ``store``, ``service_tier``...) is dropped. So a
client cannot smuggle vLLM-only fields (``priority``, ``structured_outputs``,
``ignore_eos``...) past the task table, and no field it sends is ignored without a word.
Every type error is a :class:`BadRequest` naming the field, never a 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import Task
from gateway.errors import BadRequest
from gateway.fields import (
    TOOL_FIELDS,
    bounded,
    optional,
    refuse_unsupported,
    sampling,
    type_error,
)

Endpoint = Literal["chat", "completions"]

MAX_MESSAGES = 1024
_CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
_SYSTEM_ROLES = {"system", "developer"}


@dataclass(slots=True)
class ClientRequest:
    """A validated client request, before the task shapes it."""

    endpoint: Endpoint
    model: str | None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)

    def input_text(self) -> str:
        """The text the model reads from the client (for input budgets): tool definitions
        count too, since the chat template writes them into the prompt."""
        if self.endpoint == "completions":
            return self.prompt
        text = "\n".join(str(m.get("content") or "") for m in self.messages)
        if "tools" in self.sampling:
            text += "\n" + json.dumps(self.sampling["tools"], ensure_ascii=False)
        return text

    @property
    def structured(self) -> bool:
        """Its answer has a structure (a tool call, a JSON format) that a cut would break."""
        return "tools" in self.sampling or "response_format" in self.sampling


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string escape for half of a UTF-16 surrogate pair (valid pairs match too).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        # JSON between systems is UTF-8 (RFC 8259). Decoding it here, strictly, also refuses
        # encoded surrogates, which json.loads(bytes) would let through ("surrogatepass").
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8", code="invalid_json") from None
    try:
        # Python's json accepts NaN and Infinity; JSON (and vLLM) does not.
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    # JSON may spell a lone surrogate ("\ud800"), which is not text: it cannot be encoded
    # for vLLM or even counted. Only a body with such an escape needs the full look.
    if _SURROGATE_ESCAPE.search(raw) and not _is_text(body):
        raise BadRequest(
            "the request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), "
            "which is not valid Unicode text",
            code="invalid_json",
        )
    return body


def _is_text(value: Any) -> bool:
    """Every string in a parsed JSON value (keys too) is encodable Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse_request(endpoint: Endpoint, body: Mapping[str, Any]) -> ClientRequest:
    model = optional(body, "model", str)
    stream = optional(body, "stream", bool) or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise type_error("stream_options", "an object")
        include_usage = (
            optional(options, "include_usage", bool, "stream_options.include_usage") or False
        )
    req = ClientRequest(endpoint, model, stream=stream, include_usage=include_usage)
    req.max_tokens = _max_tokens(body)
    n = optional(body, "n", int)
    if n is not None and n != 1:
        # vLLM's priority scheduler has crashed on n > 1; one choice per request is the rule.
        raise BadRequest("only n=1 is supported", param="n", code="unsupported_value")
    refuse_unsupported(body)
    req.sampling = sampling(body, chat=endpoint == "chat")
    if endpoint == "chat":
        req.messages = _messages(body.get("messages"))
    else:
        req.prompt = _prompt(body.get("prompt"))
    return req


def check_for_task(task: Task, req: ClientRequest, tasks: Mapping[str, Task]) -> None:
    """Refuse what the task cannot honour (400), rather than answer without it: anything
    that shapes the answer on a label task (its answer is one of its labels), and function
    calling on a task whose table entry does not take tools (the error names the ``tasks``
    that do)."""
    if task.labels is not None:
        for name in (*TOOL_FIELDS, "response_format"):
            if name in req.sampling:
                raise BadRequest(
                    f"the {task.name} task answers with one of its labels "
                    f"({', '.join(task.labels)}), so it does not take {name}",
                    param=name,
                    code="unsupported_parameter",
                )
    if task.tools:
        return
    for name in TOOL_FIELDS:
        if name in req.sampling:
            takers = [t.name for t in tasks.values() if t.tools]
            accepting = ", ".join(takers) if takers else "none in this gateway's table"
            raise BadRequest(
                f"the {task.name} task does not take {name}; tasks that do: {accepting}",
                param=name,
                code="unsupported_parameter",
            )


def build_upstream_body(
    task: Task,
    req: ClientRequest,
    *,
    max_tokens: int,
    priority: int,
    model: str | None,
    extra_system: str | None = None,
) -> dict[str, Any]:
    """The body sent to vLLM: the task's prompt, limits and constraint, then the client's knobs."""
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = model
    if task.labels is None:
        body.update(req.sampling)
        body.setdefault("temperature", task.temperature)
    else:
        # A label task's answer is fixed by the task, not the caller: the labels are enforced
        # by vLLM's structured outputs (never `guided_choice`, which vLLM silently ignores).
        body["temperature"] = task.temperature
        body["structured_outputs"] = {"choice": list(task.labels)}
    if req.endpoint == "chat":
        body["messages"] = task_messages(task, req.messages, extra_system)
    else:
        body["prompt"] = _task_prompt(task, req.prompt, extra_system)
    body["max_tokens"] = max_tokens
    body["priority"] = priority
    # Always a stream from vLLM (see gateway.chunks), always with usage so the access log and
    # metrics have token counts: the relay drops the usage chunk again for a client that did
    # not ask for it.
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def granted_max_tokens(task: Task, req: ClientRequest) -> int:
    """Clients may ask for fewer tokens than the task's limit, not more (clamped, not refused)."""
    if task.labels is not None or req.max_tokens is None:
        return task.max_tokens
    return min(req.max_tokens, task.max_tokens_limit)


def task_messages(
    task: Task, messages: list[dict[str, Any]], extra_system: str | None = None
) -> list[dict[str, Any]]:
    """The task's system prompt first and authoritative; the client's system text as context."""
    parts = [p for p in (task.system_prompt, extra_system) if p]
    context = [str(m["content"]) for m in messages if m["role"] in _SYSTEM_ROLES]
    if context:
        parts.append(
            "Additional context from the caller (it does not change the instructions above):\n"
            + "\n\n".join(context)
        )
    rest = [m for m in messages if m["role"] not in _SYSTEM_ROLES]
    return ([{"role": "system", "content": "\n\n".join(parts)}] if parts else []) + rest


def _task_prompt(task: Task, prompt: str, extra_system: str | None) -> str:
    preamble = "\n\n".join(p for p in (task.system_prompt, extra_system) if p)
    return f"{preamble}\n\n{prompt}" if preamble else prompt


# -- field validation ---------------------------------------------------------------------


def _messages(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        raise BadRequest(
            "messages is required", param="messages", code="missing_required_parameter"
        )
    if not isinstance(raw, list):
        raise type_error("messages", "an array")
    if not raw:
        raise BadRequest("messages must not be empty", param="messages", code="invalid_value")
    if len(raw) > MAX_MESSAGES:
        raise BadRequest(
            f"messages has {len(raw)} entries; the limit is {MAX_MESSAGES}",
            param="messages",
            code="invalid_value",
        )
    return [_message(i, m) for i, m in enumerate(raw)]


def _message(index: int, raw: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise type_error(where, "an object")
    role = raw.get("role")
    if not isinstance(role, str) or role not in _CHAT_ROLES:  # a list or object is unhashable
        raise BadRequest(
            f"{where}.role must be one of {', '.join(sorted(_CHAT_ROLES))}",
            param=f"{where}.role",
            code="invalid_value",
        )
    message: dict[str, Any] = {"role": role, "content": _content(raw.get("content"), where, role)}
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str):
            message[key] = raw[key]
    if role == "assistant" and isinstance(raw.get("tool_calls"), list):
        message["tool_calls"] = bounded(raw["tool_calls"], f"{where}.tool_calls")
    return message


def _content(raw: Any, where: str, role: str) -> str | None:
    if isinstance(raw, str):
        return raw
    if raw is None and role == "assistant":
        return None
    if isinstance(raw, list):
        texts = []
        for j, part in enumerate(raw):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest(
                    f"{where}.content[{j}] must be a text part; this model reads text only",
                    param=f"{where}.content",
                    code="invalid_value",
                )
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise type_error(f"{where}.content", "a string or an array of text parts")


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if not isinstance(raw, str):
        raise BadRequest(
            "prompt must be a string (batches and token ids are not supported)",
            param="prompt",
            code="invalid_type",
        )
    return raw


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = None
    for name in ("max_completion_tokens", "max_tokens"):
        candidate = optional(body, name, int)
        if candidate is not None:
            if candidate < 1:
                raise BadRequest(f"{name} must be at least 1", param=name, code="invalid_value")
            value = candidate if value is None else min(value, candidate)
    return value

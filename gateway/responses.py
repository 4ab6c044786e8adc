"""The OpenAI Responses API (``POST /v1/responses``) as a translation of chat completions.

    Responses body ─▶ ResponseShape.parse ─▶ chat body ─▶ the chat path (task, key, class,
                                                          queue, deadlines, preemption, tools)
    Response object ◀─ ResponseShape.response ◀──────── chat answer
    Responses events ◀─ StreamTranslator.feed ◀──────── chat SSE batches

The gateway does not relay vLLM's own ``/v1/responses``: one request path means the SLA
engine (priority queue, window, deadlines, preemption and resume) applies to Responses
clients exactly as to chat clients, and nothing here does I/O.

The gateway keeps no state between requests, so what needs stored responses is refused with
a 400 ``unsupported_parameter`` (``previous_response_id``, ``conversation``, ``background``,
``item_reference`` input items): clients send the whole conversation in ``input``, as the
OpenAI Agents SDK does by default. Answers say ``store: false``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BadRequest
from gateway.fields import optional, type_error
from gateway.protocol import MAX_MESSAGES
from gateway.response_items import call_item, message_item, status_of, usage_of

#: Fields the Responses API defines that need state or features the gateway does not have.
_UNSUPPORTED = {
    "previous_response_id": "the gateway keeps no conversation state; send the whole "
    "conversation in input",
    "conversation": "the gateway keeps no conversation state; send the whole conversation in input",
    "prompt": "the gateway stores no prompt templates; send instructions and input",
    "max_tool_calls": "it limits built-in tools, which the gateway does not run",
    "context_management": "the gateway keeps no conversation state to compact",
}
#: Sampling knobs copied to the chat body as they are; the chat path checks them (these
#: include vLLM's own, e.g. ``logit_bias`` and ``top_k``, as on chat completions).
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
)
_ROLES = {"user", "system", "developer", "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text", "refusal"}
#: ``include`` values that ask for something this gateway's answers cannot carry.
_REFUSED_INCLUDES = {"message.output_text.logprobs": "log-probabilities are not served here"}


def _refuse(param: str, why: str) -> BadRequest:
    return BadRequest(f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def _invalid(param: str, message: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(slots=True)
class ResponseShape:
    """One Responses request: the chat body it runs as, and what its answer echoes back."""

    chat_body: dict[str, Any]
    echo: dict[str, Any]
    model: str = ""  # the task, until the answer names the model that served it
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> ResponseShape:
        """The request as a chat-completions body; BadRequest (400) for what cannot map."""
        for name, why in _UNSUPPORTED.items():
            if body.get(name) is not None:
                raise _refuse(name, why)
        if optional(body, "background", bool):
            raise _refuse("background", "the gateway keeps no responses to poll")
        if (optional(body, "top_logprobs", int) or 0) > 0:
            raise _refuse("top_logprobs", "log-probabilities are not served here")
        _check_include(body.get("include"))
        _check_reasoning(body.get("reasoning"))
        truncation = body.get("truncation")
        if truncation not in (None, "auto", "disabled"):
            raise _invalid("truncation", 'truncation must be "auto" or "disabled"')
        instructions = optional(body, "instructions", str)
        chat: dict[str, Any] = {"messages": _messages(body.get("input"), instructions)}
        if "model" in body:
            chat["model"] = body["model"]
        stream = optional(body, "stream", bool) or False
        chat["stream"] = stream
        if stream:  # usage goes in response.completed, so the chat stream must carry it
            chat["stream_options"] = {"include_usage": True}
        max_output = optional(body, "max_output_tokens", int)
        if max_output is not None:
            if max_output < 1:
                raise _invalid("max_output_tokens", "max_output_tokens must be at least 1")
            chat["max_tokens"] = max_output
        for name in _PASSTHROUGH:
            if body.get(name) is not None:
                chat[name] = body[name]
        tools = _tools(body.get("tools"))
        tool_choice = _tool_choice(body.get("tool_choice"))
        parallel = optional(body, "parallel_tool_calls", bool)
        if tools:
            chat["tools"] = tools
            if parallel is not None:
                chat["parallel_tool_calls"] = parallel
        if tool_choice is not None and (tools or tool_choice not in ("auto", "none")):
            # Without tools, "auto" and "none" mean the same as nothing (OpenAI takes them
            # so); "required" or a named tool stays, and the chat path refuses it.
            chat["tool_choice"] = tool_choice
        text = _text(body.get("text"), chat)
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise type_error("metadata", "an object")
        echo = {
            "instructions": instructions,
            "max_output_tokens": max_output,
            "metadata": metadata or {},
            "parallel_tool_calls": True if parallel is None else parallel,
            "temperature": body.get("temperature"),
            "text": text,
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p"),
            "truncation": truncation or "disabled",
            "user": optional(body, "user", str),
        }
        return cls(chat, echo)

    def response(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """The Response object for a whole chat answer."""
        self.served_by(answer)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        status, details = status_of(choice.get("finish_reason"))
        item_status = "incomplete" if status == "incomplete" else "completed"
        output: list[dict[str, Any]] = []
        text = message.get("content") or ""
        calls = message.get("tool_calls") or []
        if text or not calls:
            output.append(message_item(new_id("msg"), text, item_status))
        for call in calls:
            function = call.get("function") or {}
            output.append(
                call_item(
                    new_id("fc"),
                    call.get("id") or new_id("call"),
                    function.get("name") or "",
                    function.get("arguments") or "",
                    item_status,
                )
            )
        return self.snapshot(
            status, output, usage=usage_of(answer.get("usage")), details=details, extra=answer
        )

    def served_by(self, answer: Mapping[str, Any]) -> None:
        """Name the model that answered, as chat completions do (vLLM's served model id,
        as OpenAI names a dated model for an alias); the task's name until one is known."""
        model = answer.get("model")
        if isinstance(model, str) and model:
            self.model = model

    def snapshot(
        self,
        status: str,
        output: list[dict[str, Any]],
        *,
        usage: dict[str, Any] | None = None,
        details: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Response object as it stands (``extra``: a chat answer or chunk whose
        gateway-only fields, such as a two-step task's label, are carried over)."""
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": details,
            "model": self.model,
            "output": output,
            "usage": usage,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            **self.echo,
        }
        # gateway.pipeline.LABEL_FIELD: a two-step task's label, on its answer as on chat
        if extra is not None and "sentiment" in extra:
            response["sentiment"] = extra["sentiment"]
        return response


def _check_include(include: Any) -> None:
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise type_error("include", "an array of strings")
    for value in include:
        if value in _REFUSED_INCLUDES:
            raise _refuse("include", f"{value}: {_REFUSED_INCLUDES[value]}")
    # The rest name outputs of built-in tools or reasoning, which never occur here: nothing
    # would be included either way.


def _check_reasoning(reasoning: Any) -> None:
    # Accepted and ignored: Qwen2.5 does not reason in a separate channel, so there is never
    # a reasoning item to configure or summarise; the answer is the same either way.
    if reasoning is not None and not isinstance(reasoning, Mapping):
        raise type_error("reasoning", "an object")


# -- request side -------------------------------------------------------------------------


def _messages(raw: Any, instructions: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if raw is None:
        raise BadRequest("input is required", param="input", code="missing_required_parameter")
    if not isinstance(raw, list):
        raise type_error("input", "a string or an array of input items")
    if not raw:
        raise _invalid("input", "input must not be empty")
    if len(raw) > MAX_MESSAGES:
        raise _invalid("input", f"input has {len(raw)} items; the limit is {MAX_MESSAGES}")
    for i, item in enumerate(raw):
        _add_item(messages, i, item)
    if not any(m["role"] != "system" for m in messages):
        raise _invalid("input", "input needs at least one message that is not instructions")
    return messages


def _add_item(messages: list[dict[str, Any]], index: int, item: Any) -> None:
    where = f"input[{index}]"
    if not isinstance(item, Mapping):
        raise type_error(where, "an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _invalid(
                f"{where}.role", f"{where}.role must be one of {', '.join(sorted(_ROLES))}"
            )
        messages.append({"role": role, "content": _content(item.get("content"), where)})
    elif kind == "function_call":
        call = {
            "id": _string(item, "call_id", where),
            "type": "function",
            "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where),
            },
        }
        last = messages[-1] if messages else None
        # Calls made in one turn (parallel calls, or text then calls) are one assistant turn.
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else _content(output, f"{where}.output")
        messages.append(
            {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": content}
        )
    elif kind == "reasoning":
        pass  # another model's reasoning: this one reads the answers, not their drafts
    elif kind == "item_reference":
        raise _refuse(where, "the gateway keeps no items to refer to; send the item itself")
    else:
        raise _refuse(f"{where}.type", f"{kind!r} items (only messages and function calls)")


def _content(raw: Any, where: str) -> Any:
    """Text content as chat takes it: a string, or text parts (chat joins them)."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list):
        raise type_error(f"{where}.content", "a string or an array of content parts")
    parts = []
    for j, part in enumerate(raw):
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text", part.get("refusal")) if isinstance(part, Mapping) else None
        if kind not in _TEXT_PARTS or not isinstance(text, str):
            raise _invalid(
                f"{where}.content[{j}]",
                f"{where}.content[{j}] must be a text part; this model reads text only",
            )
        parts.append({"type": "text", "text": text})
    return parts


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise type_error(f"{where}.{key}", "a string")
    return value


def _tools(raw: Any) -> list[dict[str, Any]]:
    """Responses' flat function tools as chat's nested ones."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise type_error("tools", "an array of tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise _refuse(f"tools[{i}]", f"{kind!r} tools (only function tools; none built in)")
        function: dict[str, Any] = {"name": _string(tool, "name", f"tools[{i}]")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(raw: Any) -> Any:
    if raw is None or raw in ("none", "auto", "required"):
        return raw
    if isinstance(raw, Mapping) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": _string(raw, "name", "tool_choice")}}
    raise _refuse("tool_choice", f'{raw!r} (only "none", "auto", "required" or a function)')


def _text(raw: Any, chat: dict[str, Any]) -> dict[str, Any]:
    """``text.format`` as chat's ``response_format``; the value echoed back."""
    if raw is None:
        return {"format": {"type": "text"}}
    if not isinstance(raw, Mapping):
        raise type_error("text", "an object")
    if raw.get("verbosity") is not None:
        raise _refuse("text.verbosity", "the model has no verbosity setting")
    fmt = raw.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        schema = {"name": _string(fmt, "name", "text.format")}
        if not isinstance(fmt.get("schema"), Mapping):
            raise type_error("text.format.schema", "an object")
        for key in ("schema", "description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise _invalid(
            "text.format", 'text.format.type must be "text", "json_object" or "json_schema"'
        )
    return {"format": dict(fmt)}

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
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import Task
from gateway.errors import BadRequest

Endpoint = Literal["chat", "completions"]

MAX_MESSAGES = 1024
MAX_TOOLS = 128  # OpenAI's limit
MAX_LOGIT_BIAS = 1024  # token ids in logit_bias: a bound on the body, not a model limit
#: The function-calling fields, forwarded only to tasks whose table entry says ``tools``.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
#: Fields OpenAI defines that vLLM does not serve as OpenAI means them: refused, not dropped.
_UNSUPPORTED = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "suffix": "vLLM does not support it",
    "audio": "this model reads and writes text only",
    "modalities": "this model reads and writes text only",
    "prediction": "vLLM does not support it",
    "web_search_options": "the gateway runs no search",
}
#: Structures forwarded as they are (``response_format``, ``tool_calls``) may nest this deep.
#: JSON schemas are nowhere near it; far deeper ones broke encoding the upstream body.
MAX_DEPTH = 64
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


def _bounded(value: Any, param: str) -> Any:
    """A structure forwarded as it is, if it nests at most MAX_DEPTH levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(
                    f"{param} is nested more than {MAX_DEPTH} levels deep",
                    param=param,
                    code="invalid_value",
                )
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return value


def parse_request(endpoint: Endpoint, body: Mapping[str, Any]) -> ClientRequest:
    model = _optional(body, "model", str)
    stream = _optional(body, "stream", bool) or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise _type_error("stream_options", "an object")
        include_usage = (
            _optional(options, "include_usage", bool, "stream_options.include_usage") or False
        )
    req = ClientRequest(endpoint, model, stream=stream, include_usage=include_usage)
    req.max_tokens = _max_tokens(body)
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        # vLLM's priority scheduler has crashed on n > 1; one choice per request is the rule.
        raise BadRequest("only n=1 is supported", param="n", code="unsupported_value")
    for name, why in _UNSUPPORTED.items():
        if body.get(name) is not None:
            raise BadRequest(
                f"{name} is not supported: {why}", param=name, code="unsupported_parameter"
            )
    req.sampling = _sampling(body, endpoint)
    if endpoint == "chat":
        req.messages = _messages(body.get("messages"))
    else:
        req.prompt = _prompt(body.get("prompt"))
    return req


def check_for_task(task: Task, req: ClientRequest, tool_tasks: list[str]) -> None:
    """Refuse what the task cannot honour (400), rather than answer without it: anything
    that shapes the answer on a label task (its answer is one of its labels), and function
    calling on a task whose table entry does not take tools (``tool_tasks`` do)."""
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
            accepting = ", ".join(tool_tasks) if tool_tasks else "none in this gateway's table"
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
    if req.stream:
        body["stream"] = True
        # Always ask for usage so the access log and metrics have token counts; the relay
        # drops the usage chunk again when the client did not ask for it.
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
        raise _type_error("messages", "an array")
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
        raise _type_error(where, "an object")
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
        message["tool_calls"] = _bounded(raw["tool_calls"], f"{where}.tool_calls")
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
    raise _type_error(f"{where}.content", "a string or an array of text parts")


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
        candidate = _optional(body, name, int)
        if candidate is not None:
            if candidate < 1:
                raise BadRequest(f"{name} must be at least 1", param=name, code="invalid_value")
            value = candidate if value is None else min(value, candidate)
    return value


_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def _sampling(body: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (low, high) in _NUMBER_RANGES.items():
        value = _optional(body, name, float)
        if value is not None:
            if not (low <= value <= high) or math.isnan(value):
                raise BadRequest(
                    f"{name} must be in [{low}, {high}]", param=name, code="invalid_value"
                )
            out[name] = value
    seed = _optional(body, "seed", int)
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise BadRequest("seed must fit in 64 bits", param="seed", code="invalid_value")
        out["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise _type_error("stop", "a string or an array of at most 4 strings")
        out["stop"] = stop
    _vllm_sampling(body, out)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        out["logit_bias"] = _logit_bias(logit_bias)
    if endpoint == "completions":
        logprobs = _optional(body, "logprobs", int)
        if logprobs is not None:
            if not 0 <= logprobs <= 20:
                raise BadRequest(
                    "logprobs must be in [0, 20]", param="logprobs", code="invalid_value"
                )
            out["logprobs"] = logprobs
        if _optional(body, "echo", bool):
            out["echo"] = True
    if endpoint == "chat":
        _tools(body, out)
        logprobs = _optional(body, "logprobs", bool)
        if logprobs:
            out["logprobs"] = True
            top = _optional(body, "top_logprobs", int)
            if top is not None:
                if not 0 <= top <= 20:
                    raise BadRequest(
                        "top_logprobs must be in [0, 20]",
                        param="top_logprobs",
                        code="invalid_value",
                    )
                out["top_logprobs"] = top
        response_format = body.get("response_format")
        if response_format is not None:
            if not isinstance(response_format, Mapping) or not isinstance(
                response_format.get("type"), str
            ):
                raise _type_error("response_format", "an object with a type")
            out["response_format"] = _bounded(response_format, "response_format")
    return out


#: vLLM's own sampling knobs, as its OpenAI server takes them, and their valid ranges.
_VLLM_RANGES: dict[str, tuple[float, float]] = {
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 2.0),
}


def _vllm_sampling(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    for name, (low, high) in _VLLM_RANGES.items():
        value = _optional(body, name, float)
        if value is not None:
            if not (low <= value <= high):
                raise BadRequest(
                    f"{name} must be in [{low}, {high}]", param=name, code="invalid_value"
                )
            out[name] = value
    top_k = _optional(body, "top_k", int)
    if top_k is not None:
        if top_k < -1:
            raise BadRequest(
                "top_k must be -1 or 0 (off) or positive", param="top_k", code="invalid_value"
            )
        out["top_k"] = top_k


def _logit_bias(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping) or len(raw) > MAX_LOGIT_BIAS:
        raise _type_error("logit_bias", f"an object of at most {MAX_LOGIT_BIAS} token ids")
    bias: dict[str, float] = {}
    for key, value in raw.items():
        if not str(key).isdigit():
            raise BadRequest(
                f"logit_bias keys must be token ids, got {key!r}",
                param="logit_bias",
                code="invalid_value",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(f"logit_bias[{key}]", "a number")
        if not -100 <= value <= 100:
            raise BadRequest(
                "logit_bias values must be in [-100, 100]",
                param="logit_bias",
                code="invalid_value",
            )
        bias[str(key)] = float(value)
    return bias


def _tools(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise _type_error("tools", f"an array of at most {MAX_TOOLS} tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if (
                not isinstance(tool, Mapping)
                or tool.get("type") != "function"
                or not isinstance(function, Mapping)
                or not isinstance(function.get("name"), str)
            ):
                raise _type_error(
                    f"tools[{i}]", 'a {"type": "function", "function": {"name": ...}} object'
                )
        if tools:  # an empty list means no tools (as OpenAI's SDKs send it)
            out["tools"] = _bounded(tools, "tools")
    choice = body.get("tool_choice")
    if choice is not None:
        named = (
            isinstance(choice, Mapping)
            and choice.get("type") == "function"
            and isinstance(choice.get("function"), Mapping)
            and isinstance(choice["function"].get("name"), str)
        )
        if not named and choice not in ("none", "auto", "required"):
            raise _type_error(
                "tool_choice",
                '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            )
        if choice != "none" and "tools" not in out:
            raise BadRequest("tool_choice needs tools", param="tool_choice", code="invalid_value")
        out["tool_choice"] = _bounded(choice, "tool_choice")
    parallel = _optional(body, "parallel_tool_calls", bool)
    if parallel is not None:
        out["parallel_tool_calls"] = parallel


def _optional(body: Mapping[str, Any], name: str, kind: type, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # JSON integers are unbounded; floats are not
            raise BadRequest(
                f"{param or name} is out of range", param=param or name, code="invalid_value"
            ) from None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}[kind]
        raise _type_error(param or name, expected)
    return value


def _type_error(param: str, expected: str) -> BadRequest:
    return BadRequest(f"{param} must be {expected}", param=param, code="invalid_type")

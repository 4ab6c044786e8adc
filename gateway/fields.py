"""The client's knobs in an OpenAI request: sampling, log-probabilities, the answer's format
and function calling, checked as OpenAI defines them and passed on as vLLM takes them.

Part of the allowlist of :mod:`gateway.protocol`: what is here is forwarded (for a task that
takes it), what OpenAI defines and vLLM does not serve is refused with a 400
``unsupported_parameter``, and anything else is not read at all. Every type error is a
:class:`BadRequest` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gateway.errors import BadRequest

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


def refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, why in _UNSUPPORTED.items():
        if body.get(name) is not None:
            raise BadRequest(
                f"{name} is not supported: {why}", param=name, code="unsupported_parameter"
            )


def bounded(value: Any, param: str) -> Any:
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


_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    # vLLM's own sampling knobs, as its OpenAI server takes them
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 2.0),
}


def sampling(body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    """The knobs a task may let its client set, checked, as vLLM takes them."""
    out: dict[str, Any] = {}
    for name, (low, high) in _NUMBER_RANGES.items():
        value = optional(body, name, float)
        if value is not None:
            if not (low <= value <= high) or math.isnan(value):
                raise BadRequest(
                    f"{name} must be in [{low}, {high}]", param=name, code="invalid_value"
                )
            out[name] = value
    seed = optional(body, "seed", int)
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise BadRequest("seed must fit in 64 bits", param="seed", code="invalid_value")
        out["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise type_error("stop", "a string or an array of at most 4 strings")
        out["stop"] = stop
    _top_k(body, out)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        out["logit_bias"] = _logit_bias(logit_bias)
    if not chat:
        logprobs = optional(body, "logprobs", int)
        if logprobs is not None:
            if not 0 <= logprobs <= 20:
                raise BadRequest(
                    "logprobs must be in [0, 20]", param="logprobs", code="invalid_value"
                )
            out["logprobs"] = logprobs
        if optional(body, "echo", bool):
            out["echo"] = True
    if chat:
        _tools(body, out)
        logprobs = optional(body, "logprobs", bool)
        if logprobs:
            out["logprobs"] = True
            top = optional(body, "top_logprobs", int)
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
                raise type_error("response_format", "an object with a type")
            out["response_format"] = bounded(response_format, "response_format")
    return out


def _top_k(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    top_k = optional(body, "top_k", int)
    if top_k is not None:
        if top_k < -1:
            raise BadRequest(
                "top_k must be -1 or 0 (off) or positive", param="top_k", code="invalid_value"
            )
        out["top_k"] = top_k


def _logit_bias(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping) or len(raw) > MAX_LOGIT_BIAS:
        raise type_error("logit_bias", f"an object of at most {MAX_LOGIT_BIAS} token ids")
    bias: dict[str, float] = {}
    for key, value in raw.items():
        if not str(key).isdigit():
            raise BadRequest(
                f"logit_bias keys must be token ids, got {key!r}",
                param="logit_bias",
                code="invalid_value",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise type_error(f"logit_bias[{key}]", "a number")
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
            raise type_error("tools", f"an array of at most {MAX_TOOLS} tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if (
                not isinstance(tool, Mapping)
                or tool.get("type") != "function"
                or not isinstance(function, Mapping)
                or not isinstance(function.get("name"), str)
            ):
                raise type_error(
                    f"tools[{i}]", 'a {"type": "function", "function": {"name": ...}} object'
                )
        if tools:  # an empty list means no tools (as OpenAI's SDKs send it)
            out["tools"] = bounded(tools, "tools")
    choice = body.get("tool_choice")
    if choice is not None:
        named = (
            isinstance(choice, Mapping)
            and choice.get("type") == "function"
            and isinstance(choice.get("function"), Mapping)
            and isinstance(choice["function"].get("name"), str)
        )
        if not named and choice not in ("none", "auto", "required"):
            raise type_error(
                "tool_choice",
                '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            )
        if choice != "none" and "tools" not in out:
            raise BadRequest("tool_choice needs tools", param="tool_choice", code="invalid_value")
        out["tool_choice"] = bounded(choice, "tool_choice")
    parallel = optional(body, "parallel_tool_calls", bool)
    if parallel is not None:
        out["parallel_tool_calls"] = parallel


def optional(body: Mapping[str, Any], name: str, kind: type, param: str | None = None) -> Any:
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
        raise type_error(param or name, expected)
    return value


def type_error(param: str, expected: str) -> BadRequest:
    return BadRequest(f"{param} must be {expected}", param=param, code="invalid_type")

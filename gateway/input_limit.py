"""Per-task input budgets: count the client's tokens, refuse or truncate what is too long.

Counting is exact (vLLM's ``/tokenize``) but usually free: Qwen's tokenizer is byte-level
BPE, so a text never has more tokens than UTF-8 bytes, and a text whose byte length is within
the budget needs no call at all. Only longer texts cost one ``/tokenize``.

What is counted is the client's own text (message contents or the prompt), not the task's
system prompt or the chat template around it. Over the budget, a task with
``truncate_input = true`` keeps the beginning and the end of its main input (the last user
message, or the prompt) and drops the middle, marked with ``[…]``; other tasks answer 400.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.config import Task
from gateway.errors import BadGateway, BadRequest
from gateway.outbound import UpstreamClient
from gateway.protocol import ClientRequest

MARKER = "\n[…]\n"
MIN_KEPT_TOKENS = 16  # below this a "truncated" input is not worth sending


@dataclass(frozen=True, slots=True)
class Trimmed:
    """How an input was shortened, for the ``X-Input-Truncated`` header."""

    original_tokens: int
    kept_tokens: int


async def fit_input(
    client: UpstreamClient, base_url: str, task: Task, req: ClientRequest
) -> tuple[ClientRequest, Trimmed | None]:
    """The request within the task's input budget, possibly truncated; or BadRequest."""
    budget = task.max_input_tokens
    text = req.input_text()
    if len(text.encode()) <= budget:
        return req, None
    total = len(await _tokens(client, base_url, text))
    if total <= budget:
        return req, None
    if not task.truncate_input:
        raise BadRequest(
            f"the input is {total} tokens; the {task.name} task accepts at most {budget}",
            param="messages" if req.endpoint == "chat" else "prompt",
            code="input_too_long",
        )
    main = _main_text(req)
    main_tokens = await _tokens(client, base_url, main)
    keep = budget - (total - len(main_tokens)) - 4  # room for the marker
    if keep < MIN_KEPT_TOKENS:
        raise BadRequest(
            f"the input is {total} tokens and cannot be cut to the {task.name} task's {budget}",
            code="input_too_long",
        )
    head, tail = main_tokens[: keep - keep // 2], main_tokens[len(main_tokens) - keep // 2 :]
    shortened = await _text(client, base_url, head) + MARKER + await _text(client, base_url, tail)
    return _with_main_text(req, shortened), Trimmed(total, total - len(main_tokens) + keep)


def _main_text(req: ClientRequest) -> str:
    if req.endpoint == "completions":
        return req.prompt
    return str(req.messages[_last_user(req)]["content"] or "")


def _with_main_text(req: ClientRequest, text: str) -> ClientRequest:
    if req.endpoint == "completions":
        return replace(req, prompt=text)
    messages = list(req.messages)
    index = _last_user(req)
    messages[index] = {**messages[index], "content": text}
    return replace(req, messages=messages)


def _last_user(req: ClientRequest) -> int:
    for index in range(len(req.messages) - 1, -1, -1):
        if req.messages[index]["role"] == "user":
            return index
    return len(req.messages) - 1


async def _tokens(client: UpstreamClient, base_url: str, text: str) -> list[int]:
    answer: dict[str, Any] = await client.post_json(
        f"{base_url}/tokenize", {"prompt": text, "add_special_tokens": False}
    )
    tokens = answer.get("tokens")
    if not isinstance(tokens, list):
        raise BadGateway("the upstream could not count the input's tokens", code="tokenize_failed")
    return tokens


async def _text(client: UpstreamClient, base_url: str, tokens: list[int]) -> str:
    answer = await client.post_json(f"{base_url}/detokenize", {"tokens": tokens})
    return str(answer.get("prompt", ""))

"""Putting a streamed answer back together: vLLM's chunks in, one OpenAI answer out.

The gateway asks vLLM for every answer as a stream, also when its client wants one JSON
object. Silence is then bounded the same way for both (no chunk within the read gap is a
hung upstream, however long the whole generation takes), and the gateway always knows how
far a generation got. :class:`Assembler` folds the chunks into the object vLLM would have
answered without ``stream``: the text (or a chat message with its tool calls), the
log-probabilities, the finish reason and the usage. Only ``n = 1`` reaches here (the
protocol refuses more), so there is one choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway import sse
from gateway.errors import BadGateway, GatewayError


async def collect(
    first: bytes,
    rest: AsyncIterator[bytes],
    assembler: Assembler,
    on_batch: Callable[[bytes], None] | None = None,
) -> dict[str, Any]:
    """The whole answer from a stream's batches of events (``first`` already read), folded
    into ``assembler`` (which may hold an earlier segment's); BadGateway if the stream breaks
    off, carries an error, or is not JSON. ``on_batch`` sees each batch as it arrives (the
    tenant's meter: a long answer is charged while it is generated, not at its end)."""
    batch = first
    while True:
        if on_batch is not None:
            on_batch(batch)
        chunks = sse.parse_batch(batch)
        if chunks is None:  # not plain data events: find the bad one
            chunks = [sse.parse(event) for event in sse.events(batch) if not sse.is_done(event)]
        for chunk in chunks:
            if not isinstance(chunk, dict) or ("error" in chunk and "choices" not in chunk):
                raise _in_band_error(chunk if isinstance(chunk, dict) else None)
            assembler.add(chunk)
        if sse.is_done(batch):
            return assembler.answer()
        batch = await anext(rest, b"")
        if not batch:
            raise BadGateway("the upstream ended its answer early", code="bad_upstream_response")


def _in_band_error(chunk: dict[str, Any] | None) -> GatewayError:
    if chunk is None:
        return BadGateway(
            "the upstream sent an event that is not JSON", code="bad_upstream_response"
        )
    error = chunk.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return BadGateway(f"the upstream failed: {message}", code="upstream_error")


class Assembler:
    """Feed it each chunk's JSON object in order; :meth:`answer` is the whole answer."""

    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._head: dict[str, Any] = {}
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}
        self._logprobs: dict[str, Any] | None = None
        self._choice: dict[str, Any] = {"index": 0, "finish_reason": None}
        self._usage: Any = None
        self._chunks = 0  # chunks with text

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def usage(self) -> Any:
        """The last usage the stream carried (None before any)."""
        return self._usage

    @property
    def tokens(self) -> int:
        """Tokens generated in the current segment's stream: the usage's count when the
        stream carries it in every chunk (exact), else the chunks with text (an undercount
        when a token held no whole character)."""
        if isinstance(self._usage, dict) and isinstance(self._usage.get("completion_tokens"), int):
            return int(self._usage["completion_tokens"])
        return self._chunks

    def add(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            if "system_fingerprint" in chunk:
                self._head["system_fingerprint"] = chunk["system_fingerprint"]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        # Runs once per token: the common case (text, no finish) touches three keys.
        if choice.get("finish_reason") is not None:
            self._choice["finish_reason"] = choice["finish_reason"]
            if choice.get("stop_reason") is not None:
                self._choice["stop_reason"] = choice["stop_reason"]
        if self._chat:
            delta = choice.get("delta")
            if delta:
                if delta.get("content"):
                    self._text.append(delta["content"])
                    self._chunks += 1
                if len(delta) > 1 or "content" not in delta:
                    self._add_rare(delta)
        elif choice.get("text"):
            self._text.append(choice["text"])
            self._chunks += 1
        if choice.get("logprobs"):
            self._add_logprobs(choice["logprobs"])

    def _add_rare(self, delta: dict[str, Any]) -> None:
        if delta.get("reasoning_content"):
            self._reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(call)

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        # A tool call arrives in pieces keyed by its index: id, type and name once, the
        # arguments as text fragments.
        index = call.get("index", len(self._tools))
        whole = self._tools.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            whole["id"] = call["id"]
        if call.get("type"):
            whole["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            whole["function"]["name"] += function["name"]
        if function.get("arguments"):
            whole["function"]["arguments"] += function["arguments"]

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        # Chat: {"content": [...]}; completions: {"tokens": [...], "token_logprobs": [...],
        # ...}. Each chunk carries its own tokens' entries: the whole is their concatenation.
        if self._logprobs is None:
            self._logprobs = {key: [] for key in logprobs}
        for key, values in logprobs.items():
            if isinstance(values, list):
                self._logprobs.setdefault(key, []).extend(values)

    def answer(self) -> dict[str, Any]:
        if not self._head:
            raise BadGateway(
                "the upstream's stream carried no answer", code="bad_upstream_response"
            )
        choice = dict(self._choice)
        text = "".join(self._text)
        if self._chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self._reasoning:
                message["reasoning_content"] = "".join(self._reasoning)
            if self._tools:
                message["tool_calls"] = [self._tools[i] for i in sorted(self._tools)]
                if not text:
                    message["content"] = None
            choice["message"] = message
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs
        answer = {
            **self._head,
            "object": "chat.completion" if self._chat else "text_completion",
            "choices": [choice],
        }
        if self._usage is not None:
            answer["usage"] = self._usage
        return answer

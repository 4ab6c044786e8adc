"""Pausing a generation and resuming it where it stopped, with the client none the wiser.

When the scheduler takes a running request's slot back (a more important request needs
it), the gateway closes that request's upstream call (vLLM aborts it and frees its KV
cache), keeps what was generated, and later asks vLLM to *continue* it: a chat request is
sent again with the partial answer as a last assistant message and
``continue_final_message: true, add_generation_prompt: false``; a completion request with
the partial answer appended to its prompt. vLLM's prefix cache makes re-reading the prompt
and the partial answer cheap.

Why text and not token ids (vLLM 0.32 also accepts a token-id prompt on /v1/completions):
measured on the default model (greedy, 5 prompts cut after 40 of 120 tokens), both resumed
4 of 5 answers token for token, and the fifth diverged in both at the same place (floating
point: reading the partial answer as a prompt is not bit-identical to decoding it). Text
keeps the chat format end to end (no completions chunks to translate, no token ids to strip
from every chunk), so it is the one used.

What can be paused: plain text generation only (see :func:`resumable`). A label task is
never paused (it is short, and its constraint would restart); neither is a request with
tools or a response format (the grammar would restart in the middle of a structure).

:class:`Progress` follows one request across its segments: it reads the text of each chunk
(only for requests that can be paused, so other streams stay byte-for-byte pass-through),
and rewrites a resumed segment's chunks so the client sees one stream: the first segment's
``id``, ``created`` and ``model``, no second role chunk, and usage counting the whole answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway import sse
from gateway.chunks import Assembler
from gateway.steps import Step

#: Request fields that make a generation impossible to continue faithfully from its text: a
#: structure (the grammar would restart inside it), or an echo of the prompt (a continuation's
#: prompt holds the partial answer).
_NOT_RESUMABLE = ("response_format", "tools", "tool_choice", "echo")


def resumable(step: Step) -> bool:
    """The step may be paused and resumed: its class allows it, and it is plain text."""
    request = step.request
    if step.policy.max_preemptions <= 0 or step.task.labels is not None:
        return False
    if request.endpoint == "completions" and "logprobs" in request.sampling:
        return False  # text offsets count from each segment's prompt
    return not any(key in request.sampling for key in _NOT_RESUMABLE)


def continuation(step: Step, text: str) -> tuple[Step, dict[str, Any]]:
    """The step that continues after ``text``, and the body fields that make vLLM continue."""
    request = step.request
    if request.endpoint == "completions":
        return replace(step, request=replace(request, prompt=request.prompt + text)), {}
    partial = {"role": "assistant", "content": text}
    resumed = replace(step, request=replace(request, messages=[*request.messages, partial]))
    return resumed, {"continue_final_message": True, "add_generation_prompt": False}


class Progress:
    """What one request has generated so far, across the segments of a paused generation."""

    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._text: list[str] = []
        self.tokens = 0  # chunks with text: vLLM streams one per decoded token
        self.segment = 0
        self._before = 0  # tokens generated in earlier segments
        self._prompt_tokens: int | None = None  # the first segment's, as vLLM counted them
        self._head: dict[str, Any] = {}

    @property
    def text(self) -> str:
        return "".join(self._text)

    def resumed(self, collected: Assembler | None = None) -> None:
        """A new segment starts (after a pause). ``collected``: the assembler that read a
        collected answer's chunks (its text so far, its segment's tokens and usage); by
        default what this progress read itself."""
        if collected is not None:
            if self.segment == 0 and isinstance(collected.usage, dict):
                self._note_prompt(collected.usage)
            self._text, self.tokens = [collected.text], self._before + collected.tokens
        self.segment += 1
        self._before = self.tokens

    def read(self, batch: bytes) -> bytes:
        """Note the batch's text and tokens; return what the client gets: without the
        per-chunk usage asked for to count tokens, and after a pause as the first segment."""
        chunks = sse.parse_batch(batch)
        if chunks is None:  # not plain data events: pass it on untouched
            return batch
        out = []
        for chunk in chunks:
            if not isinstance(chunk, dict) or (self.segment and self._is_role_only(chunk)):
                continue
            self._note(chunk)
            out.append(sse.encode(self._as_first_segment(chunk)))
        return b"".join(out) + (sse.DONE if sse.is_done(batch) else b"")

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """A resumed segment's usage as the whole answer's: the client's prompt, as the
        first segment counted it, and every segment's generated tokens.

        The resumed prompt re-read the earlier segments' text, but not in as many tokens as
        were generated (a tokenizer reads text back its own way), so subtracting is only the
        fallback for a first segment paused before vLLM reported any usage."""
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if self.segment == 0 or not isinstance(prompt, int) or not isinstance(completion, int):
            return usage
        if self._prompt_tokens is not None:
            prompt = self._prompt_tokens
        else:
            prompt = max(prompt - self._before, 0)
        completion += self._before
        return {
            **usage,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _note_prompt(self, usage: dict[str, Any]) -> None:
        if isinstance(usage.get("prompt_tokens"), int):
            self._prompt_tokens = usage["prompt_tokens"]

    def _note(self, chunk: dict[str, Any]) -> None:
        if not self._head:
            self._head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if self._chat else choice.get("text")
            if text:
                self._text.append(text)
                self.tokens += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            # Exact (vLLM holds back text of a partial character, so chunks undercount).
            self.tokens = self._before + usage["completion_tokens"]
            if self.segment == 0 and self._prompt_tokens is None:
                self._note_prompt(usage)

    def _is_role_only(self, chunk: dict[str, Any]) -> bool:
        choices = chunk.get("choices")
        if not self._chat or not choices:
            return False
        delta = choices[0].get("delta") or {}
        return (
            "role" in delta and not delta.get("content") and choices[0].get("finish_reason") is None
        )

    def _as_first_segment(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if self.segment:
            chunk.update(self._head)
        if chunk.get("choices"):
            chunk.pop("usage", None)  # continuous usage was the gateway's, not the client's
        elif isinstance(chunk.get("usage"), dict):
            chunk["usage"] = self.usage(chunk["usage"])
        return chunk

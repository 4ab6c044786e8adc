"""A chat-completions stream, retold as the Responses API's server-sent events.

    chat chunks:  role ─ text … text ─ tool call(id, name) ─ arguments … ─ finish ─ usage ─ [DONE]
    events:       response.created, response.in_progress
                  response.output_item.added (message), response.content_part.added
                  response.output_text.delta …
                  response.output_text.done, response.content_part.done, response.output_item.done
                  response.output_item.added (function_call)
                  response.function_call_arguments.delta …
                  response.function_call_arguments.done, response.output_item.done
                  response.completed (or response.incomplete at max_output_tokens)

Each event is ``event: <type>`` plus ``data: <json>`` with a ``sequence_number``, as OpenAI
sends them; the stream ends after the last one (Responses has no ``[DONE]``). An error after
the stream started (an in-band chat error, a deadline, a shutdown) ends it with an ``error``
event carrying the gateway's code and message, then ``response.failed``.

The OpenAI SDK's stream helper checks that every delta names an item it announced (by
``output_index``, ``item_id`` and ``content_index``) and that an item keeps its ids from
``added`` to ``done``; :class:`StreamTranslator` keeps those promises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import sse
from gateway.errors import GatewayError
from gateway.response_items import call_item, message_item, status_of, text_part, usage_of
from gateway.responses import ResponseShape, new_id


@dataclass(slots=True)
class _Item:
    """An output item being streamed: its place in ``output`` and its text so far."""

    index: int
    item: dict[str, Any]
    text: list[str]

    @property
    def id(self) -> str:
        return str(self.item["id"])


class StreamTranslator:
    """Feed it the chat stream's batches in order; each call returns the events to send."""

    def __init__(self, shape: ResponseShape) -> None:
        self._shape = shape
        self._seq = 0
        self._started = False
        self.finished = False
        self._output: list[dict[str, Any]] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # the chat tool call's index -> its item
        self._finish: Any = None
        self._usage: Any = None
        self._extra: dict[str, Any] = {}  # gateway fields of the first chunk (assist's label)

    def feed(self, batch: bytes) -> bytes:
        if self.finished:
            return b""
        out: list[bytes] = []
        chunks = sse.parse_batch(batch)
        if chunks is None:  # not plain data events: look at them one by one
            chunks = [sse.parse(event) for event in sse.events(batch) if not sse.is_done(event)]
        for chunk in chunks:
            if not isinstance(chunk, dict):
                continue
            if not self._started:
                if "sentiment" in chunk:
                    self._extra["sentiment"] = chunk["sentiment"]
                self._shape.served_by(chunk)
                out.append(self._start())
            if "error" in chunk and "choices" not in chunk:
                error = chunk["error"]
                out.append(self._fail(error if isinstance(error, dict) else {"message": error}))
                return b"".join(out)
            if chunk.get("usage") is not None:
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                out.append(self._choice(choice))
        if sse.is_done(batch):
            out.append(self._complete())
        return b"".join(out)

    def failed(self, error: GatewayError) -> bytes:
        """The events that end the stream with ``error`` (none if it has ended already)."""
        if self.finished:
            return b""
        return self._start() + self._fail(error.envelope()["error"])

    def ended(self) -> bytes:
        """The chat stream stopped without ``[DONE]`` (not expected: the relay always ends
        with it); end the Responses stream as failed rather than leave the client waiting."""
        if self.finished:
            return b""
        error = {"message": "the answer ended early", "code": "bad_upstream_response"}
        return self._start() + self._fail(error)

    # -- building events ----------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _snapshot(self, status: str, **more: Any) -> dict[str, Any]:
        return self._shape.snapshot(status, list(self._output), extra=self._extra, **more)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        response = self._snapshot("in_progress")
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def _choice(self, choice: Any) -> bytes:
        if not isinstance(choice, dict):
            return b""
        out = []
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
        delta = choice.get("delta") or {}
        if delta.get("content"):
            out.append(self._text(delta["content"]))
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                out.append(self._call(call))
        return b"".join(out)

    def _text(self, text: str) -> bytes:
        out = b""
        item = self._open
        if item is None or item.item["type"] != "message":
            item, out = self._open_message()
        item.text.append(text)
        return out + self._event(
            "response.output_text.delta",
            item_id=item.id,
            output_index=item.index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _open_message(self) -> tuple[_Item, bytes]:
        out = self._close()
        item, added = self._add(message_item(new_id("msg"), None, "in_progress"))
        return item, out + added + self._event(
            "response.content_part.added",
            item_id=item.id,
            output_index=item.index,
            content_index=0,
            part=text_part(""),
        )

    def _call(self, call: dict[str, Any]) -> bytes:
        # A call arrives in pieces keyed by its index: id and name first, then arguments.
        out = b""
        function = call.get("function") or {}
        index = call.get("index", len(self._calls))
        item = self._calls.get(index)
        if item is None:
            out += self._close()
            call_id = call.get("id") or new_id("call")
            new = call_item(new_id("fc"), call_id, function.get("name") or "", "", "in_progress")
            item, added = self._add(new)
            self._calls[index] = item
            out += added
        elif function.get("name"):
            item.item["name"] += function["name"]
        arguments = function.get("arguments")
        if not arguments:
            return out
        item.text.append(arguments)
        return out + self._event(
            "response.function_call_arguments.delta",
            item_id=item.id,
            output_index=item.index,
            delta=arguments,
        )

    def _add(self, item: dict[str, Any]) -> tuple[_Item, bytes]:
        """Open a new output item; the event that announces it."""
        self._output.append(item)
        self._open = _Item(len(self._output) - 1, item, [])
        return self._open, self._event(
            "response.output_item.added", output_index=self._open.index, item=item
        )

    def _close(self, status: str = "completed") -> bytes:
        """End the open item: its last events, and its final form in ``output``."""
        item, self._open = self._open, None
        if item is None:
            return b""
        whole = self._fill(item, status)
        if item.item["type"] == "message":
            where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            out = self._event("response.output_text.done", **where, text=whole, logprobs=[])
            out += self._event("response.content_part.done", **where, part=text_part(whole))
        else:
            out = self._event(
                "response.function_call_arguments.done",
                item_id=item.id,
                output_index=item.index,
                name=item.item["name"],
                arguments=whole,
            )
        return out + self._event(
            "response.output_item.done", output_index=item.index, item=item.item
        )

    @staticmethod
    def _fill(item: _Item, status: str) -> str:
        """Put the item's text so far into its final form; the text."""
        whole = "".join(item.text)
        item.item["status"] = status
        if item.item["type"] == "message":
            item.item["content"] = [text_part(whole)]
        else:
            item.item["arguments"] = whole
        return whole

    def _complete(self) -> bytes:
        status, details = status_of(self._finish)
        out = self._start()  # (a stream is never just [DONE], but it would still be whole)
        if not self._output:  # no text and no call: still one (empty) message, as OpenAI
            out += self._open_message()[1]
        out += self._close("incomplete" if status == "incomplete" else "completed")
        self.finished = True
        response = self._snapshot(status, usage=usage_of(self._usage), details=details)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def _fail(self, error: dict[str, Any]) -> bytes:
        """``error`` (the gateway's code and message, as a chat stream's in-band error has
        them), then ``response.failed`` (whose ``error.code`` the SDK types as one of
        OpenAI's few codes, so the gateway's travels as its ``type``)."""
        self.finished = True
        if self._open is not None:  # what it had, in its final form
            self._fill(self._open, "incomplete")
        code = "rate_limit_exceeded" if error.get("type") == "rate_limit_error" else "server_error"
        failure = {"code": code, "message": error.get("message"), "type": error.get("code")}
        out = self._event(
            "error", code=error.get("code"), message=error.get("message"), param=error.get("param")
        )
        return out + self._event(
            "response.failed", response=self._snapshot("failed", error=failure)
        )


async def translate(
    events: AsyncIterator[bytes], translator: StreamTranslator
) -> AsyncIterator[bytes]:
    """The chat stream's batches in, the Responses events out. It reads ``events`` to their
    end (after a failure too), so the stream below finishes and cleans up as for chat."""
    async for batch in events:
        out = translator.feed(batch)
        if out:
            yield out
    if not translator.finished:
        yield translator.ended()

"""An instant fake vLLM OpenAI server, cheap enough per request never to be the bottleneck.

Every answer is built once at start-up; a request costs one header search, a couple of byte
searches and one ``write``. That is what lets a proxy's overhead be measured on a 2-core
machine where the load generator, the proxy and this upstream share the CPU.

    GET  /health                    200, empty
    GET  /v1/models                 one model, "fake"
    GET  /metrics                   vllm:num_requests_running / waiting, always 0
    POST /v1/chat/completions       a small chat.completion with usage, or, when the body
    POST /v1/completions            says "stream": true, --chunks SSE chunks in vLLM's compact
                                    format, a usage-only chunk if "include_usage": true, [DONE]

HTTP/1.1 with keep-alive and pipelining; bodies must carry Content-Length (no chunked
uploads). The body is searched as bytes, not parsed, so both ``"stream":true`` and
``"stream": true`` count.

    python loadtest/fake_upstream.py --port 19001 [--chunks 50]

By default every answer is written at once. ``--first-ms`` and ``--chunk-ms`` pace it like a
generation instead (a JSON answer comes after ``first + chunks x chunk``; a stream sends its
head and first chunk after ``first``, then one chunk every ``chunk``), so a gateway in front
queues, hits deadlines mid-stream and sees clients give up, at hundreds of requests a second
(the soak's ``--upstream fake``). Answers on one connection stay in order; a connection the
client closes stops its pending writes.

    python loadtest/fake_upstream.py --port 19001 --chunks 16 --first-ms 20 --chunk-ms 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
from dataclasses import dataclass
from typing import Any, cast

import uvloop

MODEL = "fake"
MAX_HEADER_BYTES = 64 * 1024

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(
    body: bytes, content_type: bytes = b"application/json", status: bytes = b"200 OK"
) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


def _usage(chunks: int) -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}


def _answer(chat: bool) -> bytes:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help?"},
            "finish_reason": "stop",
        }
    else:
        choice = {"index": 0, "text": "Hello! How can I help?", "finish_reason": "stop"}
    return _compact(
        {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [choice],
            "usage": _usage(7),
        }
    )


def _stream(chat: bool, chunks: int, include_usage: bool) -> bytes:
    head = {
        "id": "cmpl-fake",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 0,
        "model": MODEL,
    }
    events = []
    for i in range(chunks):
        last = i == chunks - 1
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": "tok"}
        else:
            choice["text"] = "tok"
        choice["finish_reason"] = "stop" if last else None
        events.append(b"data: " + _compact({**head, "choices": [choice]}) + b"\n\n")
    if include_usage:
        usage: dict[str, Any] = {**head, "choices": [], "usage": _usage(chunks)}
        events.append(b"data: " + _compact(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return _response(b"".join(events), b"text/event-stream")


@dataclass(frozen=True, slots=True)
class Pace:
    """How long a fake generation takes: the first token, then each further chunk."""

    first_s: float = 0.0
    chunk_s: float = 0.0

    @property
    def instant(self) -> bool:
        return self.first_s <= 0 and self.chunk_s <= 0


@dataclass(frozen=True, slots=True)
class Canned:
    """Every answer the fake gives, as complete HTTP responses, built once."""

    routes: dict[tuple[bytes, bytes], bytes]
    streams: dict[tuple[bytes, bool], bytes]  # (path, include_usage) -> SSE response
    not_found: bytes
    chunks: int = 1

    @classmethod
    def build(cls, chunks: int) -> Canned:
        metrics = (
            f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n'
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0\n'
        ).encode()
        models = _compact({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        chat, completions = b"/v1/chat/completions", b"/v1/completions"
        return cls(
            routes={
                (b"GET", b"/health"): _response(b""),
                (b"GET", b"/v1/models"): _response(models),
                (b"GET", b"/metrics"): _response(metrics, b"text/plain; version=0.0.4"),
                (b"POST", chat): _response(_answer(chat=True)),
                (b"POST", completions): _response(_answer(chat=False)),
            },
            streams={
                (path, usage): _stream(path == chat, chunks, usage)
                for path in (chat, completions)
                for usage in (False, True)
            },
            not_found=_response(b'{"error":"not found"}', status=b"404 Not Found"),
            chunks=chunks,
        )

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST" and _STREAM.search(body):
            stream = self.streams.get((path, _INCLUDE_USAGE.search(body) is not None))
            if stream is not None:
                return stream
        return self.routes.get((method, path.split(b"?", 1)[0]), self.not_found)


def _paced_parts(answer: bytes, chunks: int, pace: Pace) -> list[tuple[float, bytes]]:
    """``(seconds after the start, bytes)`` to write for one answer, paced like a generation."""
    head_end = answer.find(b"\r\n\r\n") + 4
    if b"text/event-stream" not in answer[:head_end]:
        generated = answer[head_end:].startswith(b'{"id"')  # a completion, not /health etc.
        return [(pace.first_s + chunks * pace.chunk_s if generated else 0.0, answer)]
    events = answer[head_end:].split(b"\n\n")[:-1]
    parts = [(pace.first_s, answer[:head_end] + events[0] + b"\n\n")]
    parts += [(pace.first_s + i * pace.chunk_s, e + b"\n\n") for i, e in enumerate(events[1:], 1)]
    return parts


class FakeUpstream(asyncio.Protocol):
    """One connection: parse requests as they arrive (pipelining allowed), answer each."""

    def __init__(self, canned: Canned, pace: Pace | None = None) -> None:
        self._canned = canned
        self._pace = pace or Pace()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._busy_until = 0.0  # when the last answer scheduled on this connection ends
        self._timers: list[tuple[float, asyncio.TimerHandle]] = []  # (when, handle)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for _, timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _send(self, answer: bytes, close: bool) -> None:
        assert self._transport is not None
        if self._pace.instant:
            self._transport.write(answer)
            if close:
                self._close()
            return
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._busy_until)
        parts = _paced_parts(answer, self._canned.chunks, self._pace)
        self._busy_until = start + parts[-1][0]
        now = loop.time()
        self._timers = [(when, t) for when, t in self._timers if when > now]  # drop fired ones
        for i, (after, data) in enumerate(parts):
            last = close and i == len(parts) - 1
            when = start + after
            self._timers.append((when, loop.call_at(when, self._write, data, last)))

    def _write(self, data: bytes, close: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        if close:
            self._close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    self._close()
                    return
                break
            head = buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            size = int(match.group(1)) if match else 0
            if len(buffer) < end + 4 + size:
                break
            body = buffer[end + 4 : end + 4 + size]
            buffer = buffer[end + 4 + size :]
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0]
            close = _CONNECTION_CLOSE.search(head) is not None
            self._send(self._canned.answer(method, path, body), close)
            if close:
                return
        self._buffer = buffer

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve(host: str, port: int, chunks: int, pace: Pace | None = None) -> None:
    canned = Canned.build(chunks)
    pace = pace or Pace()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FakeUpstream(canned, pace), host, port, reuse_address=True, backlog=1024
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    paced = (
        "instant"
        if pace.instant
        else f"first chunk after {pace.first_s * 1000:g} ms, then one every {pace.chunk_s * 1000:g} ms"
    )
    print(
        f"fake upstream on http://{host}:{port} ({chunks} chunks per stream, {paced})", flush=True
    )
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description="Instant fake vLLM OpenAI server for load tests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    p.add_argument("--first-ms", type=float, default=0.0, help="time to the first chunk")
    p.add_argument("--chunk-ms", type=float, default=0.0, help="time between chunks")
    a = p.parse_args()
    if a.chunks < 1:
        p.error("--chunks must be at least 1")
    if a.first_ms < 0 or a.chunk_ms < 0:
        p.error("--first-ms and --chunk-ms must not be negative")
    uvloop.run(serve(a.host, a.port, a.chunks, Pace(a.first_ms / 1000, a.chunk_ms / 1000)))


if __name__ == "__main__":
    main()

"""An in-process stand-in for vLLM's OpenAI server, for the unit tier.

It speaks the same wire format as vLLM 0.32 (compact JSON chunks, a role chunk first, a
usage-only chunk before ``[DONE]`` when asked), records every request it gets, and can be
told to be slow, hang, fail or send garbage. It serves on a real loopback socket because the
gateway's upstream client is a real HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Behaviour:
    """What the fake does with the next requests; tests change it between calls."""

    reply: str = "Hello there friend"  # split into words, one chunk per word
    chunk_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    status: int = 200  # non-200: answer with an OpenAI error envelope
    garbage: bool = False  # answer 200 with a body that is not JSON / not SSE
    hang: bool = False  # accept the request and never answer
    break_after_chunks: int | None = None  # close the connection mid-stream
    healthy: bool = True
    tokenize_status: int = 200  # non-200: /tokenize fails
    tokenize_hang: bool = False  # /tokenize accepts the request and never answers
    # Streams wait on this after their first content chunk: a test sets it once the client
    # has that chunk, which proves the gateway relayed it without waiting for the rest.
    hold_after_first: asyncio.Event | None = None
    # Prompt tokens per word of a partial answer read back by a continuation. A real
    # tokenizer reads generated text back in a different number of tokens than it wrote
    # (random or multi-byte output merges); 1.0 is the identity.
    reread_tokens_per_word: float = 1.0
    # A request that has tools answers with this call (name, JSON arguments) instead of
    # words, in vLLM's pieces: id and name first, then the arguments in two fragments; once
    # the last message is the tool's result, it answers in words again.
    tool_call: tuple[str, str] | None = None


@dataclass
class Seen:
    body: dict[str, Any]
    headers: CIMultiDict[str]  # case-insensitive, like HTTP
    at: float


@dataclass
class FakeVllm:
    model: str = "fake-qwen"
    behaviour: Behaviour = field(default_factory=Behaviour)
    seen: list[Seen] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    aborted: int = 0
    finished: int = 0
    tokenize_calls: int = 0
    words_sent: int = 0  # content chunks written by streams, all requests together
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        # Cancel handlers when the client goes away, as vLLM aborts a request whose client left.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.behaviour.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{model_name="{self.model}"}} {self.running}.0\n'
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0.0\n'
            f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} 0.1\n'
        )
        return web.Response(text=text)

    async def _tokenize(self, request: web.Request) -> web.Response:
        # One token per character: simple, and enough to test budgets and truncation.
        body = await request.json()
        tokens = [ord(c) for c in body.get("prompt", "")]
        self.tokenize_calls += 1
        if self.behaviour.tokenize_hang:
            await asyncio.Event().wait()
        if self.behaviour.tokenize_status != 200:
            return web.json_response(
                {"error": "tokenizer broke"}, status=self.behaviour.tokenize_status
            )
        return web.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": "".join(chr(t) for t in body["tokens"])})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(body, CIMultiDict(request.headers), time.monotonic()))
        b = self.behaviour
        if b.hang:
            await asyncio.Event().wait()
        if b.status != 200:
            return web.json_response(
                {
                    "error": {
                        "message": f"fake error {b.status}",
                        "type": "BadRequestError",
                        "param": None,
                        "code": b.status,
                    }
                },
                status=b.status,
            )
        if b.garbage:
            return web.Response(text="<html>not json</html>", content_type="application/json")
        words = self._words(body)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(b.first_token_delay_s)
            if body.get("stream"):
                return await self._stream(request, body, words, chat)
            for _ in words[1:]:
                await asyncio.sleep(b.chunk_delay_s)
            self.finished += 1
            return web.json_response(self._completion(body, words, chat))
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            self.client_gone.set()
            raise
        finally:
            self.running -= 1

    def _words(self, body: dict[str, Any]) -> list[str]:
        choice = (body.get("structured_outputs") or {}).get("choice")
        if choice:
            return [choice[0]]
        words = self.behaviour.reply.split(" ")
        words = [w if i == 0 else " " + w for i, w in enumerate(words)]
        messages = body.get("messages") or []
        if body.get("continue_final_message") and messages and messages[-1]["role"] == "assistant":
            # Continue the partial answer, as vLLM does: the words after it.
            partial, done = messages[-1]["content"], 0
            while (
                done < len(words)
                and "".join(words[: done + 1])
                and partial.startswith("".join(words[: done + 1]))
            ):
                done += 1
            words = words[done:]
            # The partial answer is read as prompt tokens, as in vLLM.
            body["_reread"] = round(done * self.behaviour.reread_tokens_per_word)
        limit = body.get("max_tokens") or len(words)
        body["_cut"] = limit < len(words)  # vLLM's finish_reason "length"
        return words[:limit]

    def _completion(self, body: dict[str, Any], words: list[str], chat: bool) -> dict[str, Any]:
        text = "".join(words)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(body)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": 7 + body.get("_reread", 0),
                "completion_tokens": len(words),
                "total_tokens": 7 + body.get("_reread", 0) + len(words),
            },
        }

    async def _stream(
        self, request: web.Request, body: dict[str, Any], words: list[str], chat: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        options = body.get("stream_options") or {}
        continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))
        prompt_tokens = 7 + body.get("_reread", 0)
        sent = 0  # content chunks so far: vLLM's running completion_tokens

        def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta
            data = {
                "id": "chatcmpl-fake",
                "object": obj,
                "created": 0,
                "model": self.model,
                "choices": [choice],
            }
            if continuous:  # as vLLM: every chunk carries the usage so far
                data["usage"] = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": sent,
                    "total_tokens": prompt_tokens + sent,
                }
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        if chat:
            await response.write(chunk({"role": "assistant", "content": ""}))
        messages = body.get("messages") or [{}]
        answered = messages[-1].get("role") == "tool"  # a tool's result came back: text now
        call = self.behaviour.tool_call if chat and body.get("tools") and not answered else None
        if call is not None:
            name, arguments = call
            half = len(arguments) // 2
            pieces = [
                {"index": 0, "id": "chatcmpl-tool-fake", "type": "function", "function": {"name": name, "arguments": ""}},
                {"index": 0, "function": {"arguments": arguments[:half]}},
                {"index": 0, "function": {"arguments": arguments[half:]}},
            ]  # fmt: skip
            for piece in pieces:
                sent += 1
                await response.write(chunk({"tool_calls": [piece]}))
            words = ["x"] * sent  # for the usage below: one token per piece
            body["_finish"] = "tool_calls"
        for i, word in enumerate(words if call is None else ()):
            if (
                self.behaviour.break_after_chunks is not None
                and i >= self.behaviour.break_after_chunks
            ):
                request.transport.close()  # type: ignore[union-attr]
                return response
            if i:
                await asyncio.sleep(self.behaviour.chunk_delay_s)
            sent += 1
            await response.write(chunk({"content": word} if chat else word))
            self.words_sent += 1
            if i == 0 and self.behaviour.hold_after_first is not None:
                await self.behaviour.hold_after_first.wait()
        await response.write(chunk({"content": ""} if chat else "", finish=_finish(body)))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "chatcmpl-fake", "object": obj, "created": 0, "model": self.model, "choices": [],
                "usage": {"prompt_tokens": 7 + body.get("_reread", 0), "completion_tokens": len(words), "total_tokens": 7 + body.get("_reread", 0) + len(words)},
            }  # fmt: skip
            await response.write(
                b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.finished += 1
        return response


def _finish(body: dict[str, Any]) -> str:
    return str(body.get("_finish") or ("length" if body.get("_cut") else "stop"))

"""A simulated vLLM OpenAI server: vLLM's API as the gateway uses it, timed by a model.

SIMULATION. No model runs: answers are filler tokens ("tok tok ..."; a label task gets one
of its labels), and *when* each token comes out is decided by a model of vLLM's continuous
batching (``loadtest/sim_engine.py``: step cost, chunked prefill, KV-cache capacity,
``max_num_seqs``, the priority or FCFS waiting queue, no preemption for priority). One step
loop per simulated engine serves every request; no timer per token or per request.

    python loadtest/sim_vllm.py --port 19700 --preset h100-7b [--servers 4]
        [--scheduling-policy priority|fcfs] [--max-num-seqs N] [--speed 1.0]

``--servers N`` runs N independent engines on ports P .. P+N-1 in this one process (one
event loop, uvloop), so four simulated GPUs cost one process. Presets (see
``loadtest/README-sim.md`` for their sources): ``cpu`` (this machine's CPU vLLM with the
0.5B default model, fitted to the committed SLO runs) and ``h100-7b`` (Qwen2.5-7B-Instruct
on one H100, from published numbers).

What it speaks (what ``gateway/`` and ``loadtest/`` call):

    GET  /health, /ping               200
    GET  /v1/models                   one model (``--model``, default the preset's name)
    GET  /metrics                     vllm:num_requests_running / _waiting,
                                      vllm:kv_cache_usage_perc, vllm:num_preemptions_total,
                                      vllm:inter_token_latency_seconds (sum, count),
                                      vllm:time_to_first_token_seconds (sum, count),
                                      and sim_* counters (steps, busy, late and lost time)
    POST /v1/chat/completions         messages, max_tokens / max_completion_tokens,
    POST /v1/completions              priority, stream, stream_options.include_usage and
                                      .continuous_usage_stats, structured_outputs.choice,
                                      continue_final_message, seed
    POST /tokenize, /detokenize       estimated counts (no tokenizer), filler text

A closed connection aborts its request at the next engine step (as vLLM frees a
disconnected request's KV cache). The chunks are vLLM's compact JSON, the usage chunk has
``"choices":[]``, and a stream ends with ``data: [DONE]``. Not implemented: ``n > 1``,
logprobs, tools, ``return_token_ids``, token-id prompts on chat, and HTTP request bodies
without Content-Length.

If the process cannot keep up (a busy CPU), steps run late: the engine's timeline keeps its
pace for up to ``MAX_DEBT_S`` behind the clock (tokens come in bursts, throughput holds);
beyond that the lost time is forgiven and counted in ``sim_lost_seconds_total``. A run
with lost time did not simulate the GPU faithfully; the benchmark reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtest.*` importable
    sys.path.insert(0, str(ROOT))

from loadtest.sim_engine import (  # noqa: E402
    PRESETS,
    TOKEN,
    Costs,
    Emitted,
    Engine,
    Policy,
    Seq,
    answer_length,
    estimate_tokens,
    label_for,
    prompt_tokens,
)

MAX_HEADER_BYTES = 64 * 1024
#: How far the engine's timeline may fall behind the clock before the lag is forgiven.
MAX_DEBT_S = 0.25
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_ids = itertools.count(1)


def _http(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _error(status: int, message: str) -> bytes:
    reason = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return _http(f"{status} {reason}", orjson.dumps(body))


def _chunk(data: bytes) -> bytes:
    """One piece of a chunked HTTP body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
END_OF_BODY = b"0\r\n\r\n"


class Generation:
    """One generation request's answer: writes its tokens as the engine emits them."""

    def __init__(
        self,
        conn: Connection,
        body: dict[str, Any],
        chat: bool,
        model: str,
        prompt: int,
        max_tokens: int,
    ) -> None:
        self.conn = conn
        self.chat = chat
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        self.include_usage = bool(options.get("include_usage"))
        self.continuous_usage = self.include_usage and bool(options.get("continuous_usage_stats"))
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.label = label_for(body)
        self.texts: list[str] = []
        rid = next(_ids)
        created = int(time.time())
        self.id = f"chatcmpl-sim{rid}" if chat else f"cmpl-sim{rid}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self._head = orjson.dumps(
            {"id": self.id, "object": self.object, "created": created, "model": model}
        )[:-1]  # without the closing brace
        self.model = model
        self.created = created
        self.seq: Seq | None = None

    def text_of(self, index: int) -> str:
        """The text of the ``index``-th generated token (1-based)."""
        if self.label is not None:
            return self.label if index == 1 else ""
        return TOKEN

    def emit(self, generated: int, finished: bool) -> None:
        text = self.text_of(generated)
        self.texts.append(text)
        if not self.stream:
            if finished:
                self.conn.answer(self._whole(generated))
            return
        out = b""
        if generated == 1 and self.chat:
            out += self._event({"role": "assistant", "content": ""}, None, 0)
        reason = self._finish_reason(generated) if finished else None
        out += self._event({"content": text} if self.chat else text, reason, generated)
        if finished:
            if self.include_usage:
                out += b"data: " + self._head + b',"choices":[],"usage":'
                out += self._usage(generated) + b"}\n\n"
            out += b"data: [DONE]\n\n"
            self.conn.write(_chunk(out) + END_OF_BODY)
            self.conn.done()
        else:
            self.conn.write(_chunk(out))

    def _event(self, delta: Any, reason: str | None, generated: int) -> bytes:
        key = b'"delta":' if self.chat else b'"text":'
        finish = b"null" if reason is None else b'"' + reason.encode() + b'"'
        tail = b"" if self.chat else b',"stop_reason":null'
        usage = b',"usage":' + self._usage(generated) if self.continuous_usage else b""
        return (
            b"data: " + self._head + b',"choices":[{"index":0,' + key + orjson.dumps(delta)
            + b',"logprobs":null,"finish_reason":' + finish + tail + b"}]" + usage + b"}\n\n"
        )  # fmt: skip

    def _usage(self, generated: int) -> bytes:
        return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
            self.prompt,
            self.prompt + generated,
            generated,
        )

    def _finish_reason(self, generated: int) -> str:
        return "length" if generated >= self.max_tokens and self.label is None else "stop"

    def _whole(self, generated: int) -> bytes:
        text = "".join(self.texts)
        reason = self._finish_reason(generated)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if self.chat
            else {"index": 0, "text": text}
        )
        choice.update({"logprobs": None, "finish_reason": reason, "stop_reason": None})
        answer = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": self.prompt,
                "total_tokens": self.prompt + generated,
                "completion_tokens": generated,
            },
        }
        return _http("200 OK", orjson.dumps(answer))


class SimServer:
    """One simulated vLLM: an engine, its step loop, and the requests it is answering."""

    def __init__(self, costs: Costs, policy: Policy, model: str) -> None:
        self.engine = Engine(costs, policy)
        self.model = model
        self.answers: dict[int, Generation] = {}
        self._wake = asyncio.Event()
        self._seq_ids = itertools.count(1)
        self.late_s = 0.0  # steps that ended after their simulated time (summed lateness)
        self.lost_s = 0.0  # lag forgiven: time the simulated GPU did not get
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.listener: asyncio.Server | None = None
        self.task: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        """Stop listening and stop the step loop (tests; the CLI just exits)."""
        if self.listener is not None:
            self.listener.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # -- requests -------------------------------------------------------------------------

    def start(self, gen: Generation, body: dict[str, Any]) -> None:
        priority = body.get("priority", 0)
        seq = Seq(
            id=next(self._seq_ids),
            priority=priority if isinstance(priority, int) else 0,
            arrival=asyncio.get_running_loop().time(),
            prompt_tokens=gen.prompt,
            target=answer_length(body, gen.max_tokens),
        )
        gen.seq = seq
        self.answers[seq.id] = gen
        self.engine.add(seq)
        self._wake.set()

    def abort(self, gen: Generation) -> None:
        if gen.seq is not None and gen.seq.id in self.answers:
            del self.answers[gen.seq.id]
            self.engine.abort(gen.seq)
            self._wake.set()

    # -- the step loop --------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()  # the engine's timeline: when the current step ends
        while True:
            if self.engine.idle():
                self._wake.clear()
                await self._wake.wait()
                t = loop.time()
            now = loop.time()
            if t < now - MAX_DEBT_S:
                self.lost_s += now - MAX_DEBT_S - t
                t = now - MAX_DEBT_S
            result = self.engine.step()
            if result.batch == 0:  # nothing schedulable (the head does not fit): wait
                self._wake.clear()
                await self._wake.wait()
                t = loop.time()
                continue
            t += result.duration
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_s -= delay
                await asyncio.sleep(0)  # let the connections in
            self._deliver(result.emitted, t)

    def _deliver(self, emitted: list[Emitted], at: float) -> None:
        for e in emitted:
            gen = self.answers.get(e.seq.id)
            if gen is None:
                continue
            if e.generated == 1 and e.seq.preemptions == 0:
                self.ttft_sum += at - e.seq.arrival
                self.ttft_count += 1
            if e.finished:
                del self.answers[e.seq.id]
            gen.emit(e.generated, e.finished)

    # -- metrics --------------------------------------------------------------------------

    def metrics(self) -> bytes:
        e, k, label = self.engine, self.engine.counters, f'{{model_name="{self.model}"}}'
        lines = [
            ("vllm:num_requests_running", e.num_running),
            ("vllm:num_requests_waiting", e.num_waiting),
            ("vllm:kv_cache_usage_perc", round(e.kv_usage, 6)),
            ("vllm:num_preemptions_total", k.preemptions),
            ("vllm:prompt_tokens_total", k.prompt_tokens),
            ("vllm:generation_tokens_total", k.generation_tokens),
            ("vllm:inter_token_latency_seconds_sum", round(k.itl_sum_s, 6)),
            ("vllm:inter_token_latency_seconds_count", k.itl_count),
            ("vllm:time_to_first_token_seconds_sum", round(self.ttft_sum, 6)),
            ("vllm:time_to_first_token_seconds_count", self.ttft_count),
            ("sim_steps_total", k.steps),
            ("sim_busy_seconds_total", round(k.busy_s, 6)),
            ("sim_late_seconds_total", round(self.late_s, 6)),
            ("sim_lost_seconds_total", round(self.lost_s, 6)),
            ("sim_finished_total", k.finished),
            ("sim_aborted_total", k.aborted),
        ]
        return "".join(f"{name}{label} {value}\n" for name, value in lines).encode()


class Connection(asyncio.Protocol):
    """One client connection: requests in order (pipelining allowed), one answer at a time."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._active: Generation | None = None
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._active is not None:
            self.server.abort(self._active)
            self._active = None
        self._transport = None

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def answer(self, response: bytes) -> None:
        self.write(response)
        self.done()

    def done(self) -> None:
        """The active answer is complete: go on with what else the client sent."""
        self._active = None
        if self._close_after:
            if self._transport is not None:
                self._transport.close()
            return
        self._process()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._active is None:
            self._process()

    def _process(self) -> None:
        while self._active is None and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    self._transport.close()
                return
            head = self._buffer[:end]
            match = _CONTENT_LENGTH.search(head)
            size = int(match.group(1)) if match else 0
            if len(self._buffer) < end + 4 + size:
                return
            body = self._buffer[end + 4 : end + 4 + size]
            self._buffer = self._buffer[end + 4 + size :]
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("latin-1")
            self._close_after = _CONNECTION_CLOSE.search(head) is not None
            self._route(method.decode("latin-1"), path, body)
            if self._active is None and self._close_after:
                self._transport.close()
                return

    def _route(self, method: str, path: str, raw: bytes) -> None:
        server = self.server
        if method == "GET":
            if path in ("/health", "/ping"):
                self.write(_http("200 OK", b""))
            elif path == "/v1/models":
                models = {
                    "object": "list",
                    "data": [{"id": server.model, "object": "model", "owned_by": "vllm-sim"}],
                }
                self.write(_http("200 OK", orjson.dumps(models)))
            elif path == "/metrics":
                self.write(_http("200 OK", server.metrics(), b"text/plain; version=0.0.4"))
            else:
                self.write(_error(404, f"no route {path}"))
            return
        if method != "POST":
            self.write(_error(405, f"{method} is not served"))
            return
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body is not an object")
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.write(_error(400, f"invalid JSON body: {exc}"))
            return
        handler = _POST.get(path)
        if handler is None:
            self.write(_error(404, f"no route {path}"))
            return
        handler(self, body)

    def _generate(self, body: dict[str, Any], chat: bool) -> None:
        server = self.server
        if chat and not isinstance(body.get("messages"), list):
            self.write(_error(400, "messages is required"))
            return
        if not chat and not isinstance(body.get("prompt"), str | list):
            self.write(_error(400, "prompt is required"))
            return
        prompt = prompt_tokens(body)
        costs = server.engine.costs
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        default = costs.max_model_len - prompt if chat else 16
        max_tokens = asked if isinstance(asked, int) and asked > 0 else default
        if prompt + max_tokens > costs.max_model_len or prompt + 1 > costs.kv_tokens:
            self.write(
                _error(
                    400,
                    f"This model's maximum context length is {costs.max_model_len} tokens; "
                    f"the request has {prompt} prompt tokens and asks for {max_tokens}",
                )
            )
            return
        gen = Generation(self, body, chat, server.model, prompt, max_tokens)
        self._active = gen
        if gen.stream:
            self.write(STREAM_HEAD)
        server.start(gen, body)

    def _chat(self, body: dict[str, Any]) -> None:
        self._generate(body, chat=True)

    def _completions(self, body: dict[str, Any]) -> None:
        self._generate(body, chat=False)

    def _tokenize(self, body: dict[str, Any]) -> None:
        text = body.get("prompt")
        count = prompt_tokens(body) if not isinstance(text, str) else estimate_tokens(text)
        answer = {
            "count": count,
            "max_model_len": self.server.engine.costs.max_model_len,
            "tokens": list(range(count)),
        }
        self.write(_http("200 OK", orjson.dumps(answer)))

    def _detokenize(self, body: dict[str, Any]) -> None:
        tokens = body.get("tokens")
        count = len(tokens) if isinstance(tokens, list) else 0
        self.write(_http("200 OK", orjson.dumps({"prompt": TOKEN * count})))


_POST: dict[str, Callable[[Connection, dict[str, Any]], None]] = {
    "/v1/chat/completions": Connection._chat,
    "/v1/completions": Connection._completions,
    "/tokenize": Connection._tokenize,
    "/detokenize": Connection._detokenize,
}


async def serve(
    host: str, ports: list[int], costs: Costs, policy: Policy, model: str
) -> list[SimServer]:
    """Start one simulated vLLM per port; returns them (their loops run as tasks)."""
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        server = SimServer(costs, policy, model)
        server.listener = await loop.create_server(
            lambda s=server: Connection(s),  # type: ignore[misc]
            host,
            port,
            reuse_address=True,
            backlog=2048,
        )
        server.task = loop.create_task(server.run())
        servers.append(server)
    return servers


async def _main(args: argparse.Namespace) -> None:
    costs = PRESETS[args.preset]
    if args.max_num_seqs:
        costs = costs.__class__(**{**_fields(costs), "max_num_seqs": args.max_num_seqs})
    if args.speed != 1.0:
        costs = costs.scaled(args.speed)
    ports = [args.port + i for i in range(args.servers)]
    model = args.model or f"sim-{args.preset}"
    await serve(args.host, ports, costs, args.scheduling_policy, model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"simulated vLLM ({args.preset}, {args.scheduling_policy}, max_num_seqs "
        f"{costs.max_num_seqs}, speed x{args.speed:g}) on "
        + ", ".join(f"http://{args.host}:{p}" for p in ports),
        flush=True,
    )
    await stop.wait()


def _fields(costs: Costs) -> dict[str, Any]:
    return {name: getattr(costs, name) for name in costs.__dataclass_fields__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Simulated vLLM OpenAI server (no model).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--servers", type=int, default=1, help="engines on port, port+1, ... [1]")
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100-7b")
    p.add_argument("--scheduling-policy", choices=("priority", "fcfs"), default="priority")
    p.add_argument("--max-num-seqs", type=int, help="override the preset's")
    p.add_argument("--speed", type=float, default=1.0, help="engine speed factor [1.0]")
    p.add_argument("--model", help="served model name [sim-<preset>]")
    args = p.parse_args(argv)
    if args.servers < 1 or args.speed <= 0:
        p.error("--servers must be at least 1 and --speed positive")
    return args


def main() -> None:
    args = parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()

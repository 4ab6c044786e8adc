"""An open-loop load generator: send each request of a trace at its time, whatever came before.

Closed-loop tools (Locust's users, wrk's connections) slow down when the server does, which
hides overload. Here the arrival times are fixed in advance (:func:`workload.poisson_trace`)
and every request gets its own task, so a slow server faces a growing queue, as in
production. Each request ends as exactly one :class:`Result`; its ``outcome`` says how:

    ok        a complete answer (JSON, or a stream that ended with ``[DONE]``)
    error     an explicit error: an HTTP error status with OpenAI's envelope, or an in-band
              SSE error event (``reason`` says which: "429 queue_full", "504 queue", ...)
    lost      no answer and no explicit error: the connection broke, the stream stopped
              without ``[DONE]``, or the body was not understood
    cutoff    still running when the run's time budget ended (the benchmark gave up)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.workload import Arrival


@dataclass(slots=True)
class Result:
    """One request's fate. Times are seconds; ``at`` is its scheduled arrival in the run."""

    index: int
    task: str
    at: float
    lag: float = 0.0  # how late the generator sent it (a busy load generator shows here)
    outcome: str = "cutoff"
    reason: str | None = None  # for errors and lost requests: status and code, bounded
    status: int | None = None
    ttft: float | None = None  # streams: send to the first chunk (the first token)
    latency: float | None = None  # send to the complete answer
    elapsed: float | None = None  # send to the end, whatever the outcome
    completion_tokens: int | None = None
    queue_s: float | None = None  # the gateway's own queue wait (Server-Timing), if any
    degraded: bool = False


BodyFor = Callable[[Arrival], dict[str, Any]]


async def run_trace(
    url: str | Sequence[str], trace: Sequence[Arrival], body_for: BodyFor, drain_s: float
) -> list[Result]:
    """Send ``trace`` to ``url`` open-loop; wait at most ``drain_s`` after the last arrival.
    Several URLs take the requests in turn (a round-robin balancer in front of servers)."""
    urls = [url] if isinstance(url, str) else list(url)
    results = [Result(a.index, a.task, a.at) for a in trace]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: list[asyncio.Task[None]] = []
        for arrival, result in zip(trace, results, strict=True):
            delay = start + arrival.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            result.lag = max(loop.time() - start - arrival.at, 0.0)
            target = urls[arrival.index % len(urls)]
            tasks.append(asyncio.create_task(_send(session, target, body_for(arrival), result)))
        end_of_arrivals = trace[-1].at if trace else 0.0
        remaining = start + end_of_arrivals + drain_s - loop.time()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0.0))
            for task in pending:
                task.cancel()  # closes the connection: the server sees the client go away
            await asyncio.gather(*pending, return_exceptions=True)
    return results


async def run_closed(
    url: str,
    arrivals: Iterator[Arrival],
    body_for: BodyFor,
    concurrency: int,
    duration_s: float,
) -> list[tuple[float, Result]]:
    """Keep ``concurrency`` requests in flight for ``duration_s``; (finish time, result) each.

    This is how capacity is measured: with as many requests in flight as vLLM runs at once,
    completions per second is the most the server does for this mix.
    """
    done: list[tuple[float, Result]] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def worker() -> None:
            while loop.time() - start < duration_s:
                arrival = next(arrivals)
                result = Result(arrival.index, arrival.task, loop.time() - start)
                await _send(session, url, body_for(arrival), result)
                done.append((loop.time() - start, result))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], result: Result
) -> None:
    sent = time.monotonic()
    try:
        async with session.post(url, json=body) as response:
            result.status = response.status
            result.queue_s = _server_timing_queue(response.headers.get("Server-Timing"))
            result.degraded = "X-Degraded" in response.headers
            if response.status != 200:
                _http_error(result, response.status, await response.read())
            elif body.get("stream"):
                await _read_stream(response, result, sent)
            else:
                _read_json(result, await response.read())
    except asyncio.CancelledError:
        result.outcome, result.elapsed = "cutoff", time.monotonic() - sent
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.outcome, result.reason = "lost", f"transport {type(exc).__name__}"
    now = time.monotonic()
    result.elapsed = now - sent
    if result.outcome == "ok":
        result.latency = now - sent


async def _read_stream(response: aiohttp.ClientResponse, result: Result, sent: float) -> None:
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            if result.outcome != "error":
                result.outcome = "ok"
            return
        if result.ttft is not None and b'"usage"' not in data and b'"error"' not in data:
            continue  # a content chunk after the first: nothing to read (saves the parse at
            # GPU-scale rates, where the generator shares two cores with what it measures)
        try:
            chunk = json.loads(data)
        except ValueError:
            result.outcome, result.reason = "lost", "unparsable event"
            return
        if "error" in chunk:  # in band: the status line was already 200
            result.outcome, result.reason = "error", "in-band " + _reason(200, chunk["error"])
            continue
        if chunk.get("choices") and result.ttft is None:
            result.ttft = time.monotonic() - sent
        _take_usage(result, chunk)
    result.outcome, result.reason = "lost", "stream ended without [DONE]"


def _read_json(result: Result, raw: bytes) -> None:
    try:
        answer = json.loads(raw)
        if not isinstance(answer["choices"][0]["message"], dict):
            raise TypeError("an answer has a message")
    except (ValueError, KeyError, IndexError, TypeError):
        result.outcome, result.reason = "lost", "unparsable answer"
        return
    result.outcome = "ok"
    _take_usage(result, answer)


def _http_error(result: Result, status: int, raw: bytes) -> None:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    result.outcome, result.reason = "error", _reason(status, error)


def _reason(status: int, error: Any) -> str:
    """A bounded label: status, code, and for deadlines the stage the gateway names."""
    if not isinstance(error, dict):
        return f"{status} no envelope"
    code = error.get("code") or error.get("type") or "unknown"
    if code == "deadline_exceeded":
        message = str(error.get("message", ""))
        stage = (
            "queue" if "queue" in message else "upstream" if "upstream" in message else "dispatch"
        )
        return f"{status} {code} ({stage})"
    return f"{status} {code}"


def _take_usage(result: Result, chunk: dict[str, Any]) -> None:
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]


def _server_timing_queue(header: str | None) -> float | None:
    """The ``queue;dur=<ms>`` part of a Server-Timing header, in seconds."""
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if name == "queue" and rest.startswith("dur="):
            try:
                return float(rest[4:]) / 1000
            except ValueError:
                return None
    return None

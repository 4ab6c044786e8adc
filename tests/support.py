"""Helpers the test tiers share: waiting for a condition, reading metrics, checking errors,
and driving the gateway as a raw ASGI app (for events a real socket cannot time exactly)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait for a condition that another task makes true; fail the test if it never does."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def metric_value(text: str, prefix: str) -> float:
    """The value of the first Prometheus sample line starting with ``prefix``."""
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starts with {prefix}")


async def metric(c: httpx.AsyncClient, prefix: str) -> float:
    return metric_value((await c.get("/metrics")).text, prefix)


async def sample_vllm(url: str, seen: list[float], stop: asyncio.Event) -> None:
    """vLLM's running + waiting, from one reading of its metrics page at ``url``, every 50 ms
    (a busy vLLM answers slowly: then less often), until ``stop`` is set. With
    ``--max-num-seqs`` equal to the gateway's window, running alone could never exceed it: the
    sum is what shows the gateway put more on vLLM than the window."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while not stop.is_set():
            text = (await c.get("/metrics")).text
            running = metric_value(text, "vllm:num_requests_running")
            seen.append(running + metric_value(text, "vllm:num_requests_waiting"))
            await asyncio.sleep(0.05)


def assert_envelope(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """The response is OpenAI's error envelope with this status (and code); returns the error."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# -- the app as a raw ASGI callable ---------------------------------------------------------


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan; yield the state that requests get in ``scope["state"]``."""
    state: dict[str, Any] = {}
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"}, "state": state}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield state
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


def http_scope(
    state: dict[str, Any], method: str, path: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": dict(state),
    }


async def asgi_call(
    app: ASGIApp,
    state: dict[str, Any],
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    receive: Receive | None = None,
    send: Callable[[Message], Awaitable[None]] | None = None,
) -> list[Message]:
    """One request through the app; returns what it sent. ``receive``/``send`` override the
    default client (which sends ``body`` as JSON, then waits until the answer is complete)."""
    raw = b"" if body is None else json.dumps(body).encode()
    sent: list[Message] = []
    complete = asyncio.Event()
    first = True

    async def default_receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": raw, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def record(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()
        if send is not None:
            await send(message)

    hdrs = {"content-type": "application/json", **(headers or {})}
    await app(http_scope(state, method, path, hdrs), receive or default_receive, record)
    return sent


def body_of(messages: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def status_of(messages: list[Message]) -> int:
    return next(int(m["status"]) for m in messages if m["type"] == "http.response.start")


async def asgi_get(app: ASGIApp, state: dict[str, Any], path: str) -> tuple[int, bytes]:
    messages = await asgi_call(app, state, "GET", path)
    return status_of(messages), body_of(messages)

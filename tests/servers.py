"""Real uvicorn servers for tests (the gateway on a loopback socket in the test's event loop), and
reading what they answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import Config
from gateway.settings import Settings


@asynccontextmanager
async def running_gateway(
    settings: Settings, config: Config | None = None, *, wait_ready: bool = True
) -> AsyncIterator[str]:
    """Serve the gateway on 127.0.0.1 (a free port); yield its base URL; stop it after."""
    app = create_app(settings, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on"
        )
    )
    # The test process keeps its own Ctrl-C behaviour; servers here stop via should_exit.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # surface a startup failure
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        if wait_ready:
            await wait_until_ready(url)
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def wait_until_ready(url: str, timeout_s: float = 10.0) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (await client.get("/ready")).status_code != 200:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{url} did not become ready in {timeout_s} s")
            await asyncio.sleep(0.02)


def server_timing_ms(headers: Mapping[str, str], name: str) -> float:
    """One ``Server-Timing`` entry's duration in ms, e.g. ``server_timing_ms(r.headers, "queue")``."""
    for entry in headers["server-timing"].split(","):
        metric, _, duration = entry.strip().partition(";dur=")
        if metric == name:
            return float(duration)
    raise AssertionError(f"no {name!r} in Server-Timing: {headers['server-timing']}")

"""Real gateways for tests: on a loopback socket in the test's event loop, or as their own
``python -m gateway`` process; and reading what they answer."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.config import Config
from gateway.history import History
from gateway.settings import Settings
from tests.vllm_server import ROOT


@asynccontextmanager
async def running_gateway(
    settings: Settings,
    config: Config | None = None,
    *,
    wait_ready: bool = True,
    history: History | None = None,
    prefix: str = "",
) -> AsyncIterator[str]:
    """Serve the gateway on 127.0.0.1 (a free port); yield its base URL; stop it after.

    ``prefix`` serves it under a path, as a reverse proxy that strips the prefix does (the
    URL yielded includes it); ``history`` is passed to :func:`create_app`.
    """
    app: ASGIApp = create_app(settings, config, history=history)
    if prefix:
        app = _under_prefix(prefix, app)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # As `python -m gateway` serves. uvicorn's default (5 s) equals httpx's idle expiry:
            # after an event-loop stall (this machine's vCPUs stall for seconds while vLLM
            # generates) a client may send a request on a connection the server closes in
            # the same moment. A label request got a ReadError that way on a loaded run.
            timeout_keep_alive=30,
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
    url = f"http://127.0.0.1:{port}{prefix}"
    try:
        if wait_ready:
            await wait_until_ready(url)
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _under_prefix(prefix: str, app: ASGIApp) -> ASGIApp:
    """``app`` served under ``prefix``: a proxy's 404 for other paths, the prefix stripped."""

    async def under(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if not path.startswith(prefix + "/"):
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b"not under " + prefix.encode()})
                return
            raw = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path[len(prefix) :], "raw_path": raw[len(prefix) :]}
        await app(scope, receive, send)

    return under


@asynccontextmanager
async def gateway_process(args: Sequence[str], port: int, log: Path) -> AsyncIterator[str]:
    """``python -m gateway --host 127.0.0.1 --port PORT ARGS...`` as its own process, as
    deployed; yields its base URL once ``/ready`` answers 200, and stops it (by its PID) after.
    Its output goes to ``log``."""
    async with gateway_process_handle(args, port, log) as (url, _):
        yield url


@asynccontextmanager
async def gateway_process_handle(
    args: Sequence[str], port: int, log: Path
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """:func:`gateway_process`, also yielding the process (to signal it; a process already
    ended, e.g. SIGKILLed by the test, is left alone)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), *args,
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await until_up(f"{url}/ready", process, log, timeout_s=60)
        yield url, process
    finally:
        await stop_process(process)


async def until_up(
    url: str, process: asyncio.subprocess.Process, log: Path, timeout_s: float
) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log`` if the process we
    started exits first, or after ``timeout_s``."""
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.returncode is None, _tail(log)
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} did not answer 200 in {timeout_s} s"
            await asyncio.sleep(0.2)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL after 20 s."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()


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

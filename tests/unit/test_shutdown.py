"""Graceful shutdown of ``python -m gateway`` on SIGTERM, in front of the fake vLLM.

The gateway runs as a real process (signals, uvicorn's shutdown, the exit status are the
point); the fake runs in the test's event loop so the test can see what reached it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_vllm import FakeVllm

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


class Gateway:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""
        self.log: list[str] = []

    async def read_log(self, started: asyncio.Future[str]) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if found and not started.done():
                started.set_result(found.group(1))
        if not started.done():
            started.set_exception(RuntimeError("the gateway exited:\n" + "\n".join(self.log)))


@asynccontextmanager
async def gateway_process(fake: FakeVllm, *args: str) -> AsyncIterator[Gateway]:
    """``python -m gateway`` on a free loopback port in front of ``fake``; killed if left running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0",
        "--upstreams", fake.url, "--health-interval", "0.2", "--access-log", "off", *args,
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    gateway = Gateway(proc)
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reader = asyncio.create_task(gateway.read_log(started))
    try:
        async with asyncio.timeout(20):
            gateway.url = await started
            async with httpx.AsyncClient(base_url=gateway.url) as c:
                while (await c.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
        yield gateway
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


async def until(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def queue_depth(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    found = re.search(r'^gateway_queue_depth\{priority_class="interactive"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else -1.0


async def open_stream(c: httpx.AsyncClient, sink: list[str]) -> None:
    """Stream a chat answer into ``sink``, event by event."""
    async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line:
                sink.append(line.removeprefix("data: "))


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"] == "1"


async def refused(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url) as fresh:
            await fresh.get("/health")
    except httpx.ConnectError:
        return True
    return False


async def test_sigterm_lets_a_started_stream_finish_and_answers_the_queue(fake: FakeVllm) -> None:
    fake.behaviour.reply = "one two three four five six"
    fake.behaviour.chunk_delay_s = 0.05
    fake.behaviour.hold_after_first = hold = asyncio.Event()  # the stream waits for the test
    async with (
        gateway_process(fake, "--window", "1", "--shutdown-grace", "10") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=15) as c,
        httpx.AsyncClient(base_url=gw.url, timeout=15) as probe,
    ):
        events: list[str] = []
        stream = asyncio.create_task(open_stream(c, events))
        await until(lambda: asyncio.sleep(0, len(events) >= 2))  # role chunk, first word
        queued = asyncio.create_task(probe.post("/v1/chat/completions", json=CHAT))
        await until(lambda: queue_depth(c))
        assert len(fake.seen) == 1  # the queued one never left the gateway

        sigterm = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert_shutting_down(await queued)  # at once, not after the stream
        await until(lambda: refused(gw.url), 2.0)  # no new connections, the stream still open
        assert time.monotonic() - sigterm < 2.0
        assert not stream.done()
        hold.set()
        await stream
        async with asyncio.timeout(5):
            assert await gw.proc.wait() == 0
        elapsed = time.monotonic() - sigterm

    assert events[-1] == "[DONE]"
    words = [
        json.loads(e)["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
        if "choices" in json.loads(e)
    ]
    assert "".join(words) == fake.behaviour.reply  # all of it, no in-band error
    assert elapsed < 8  # it left once the stream was done, not at the grace's end (10 s)
    assert (fake.finished, fake.aborted, fake.running, len(fake.seen)) == (1, 0, 0, 1)
    assert "draining, grace period 10.0 s" in "\n".join(gw.log)


async def test_past_the_grace_period_requests_are_cut_and_their_upstream_calls_closed(
    fake: FakeVllm,
) -> None:
    fake.behaviour.reply = " ".join(["word"] * 30)
    fake.behaviour.chunk_delay_s = 1.0
    async with (
        gateway_process(fake, "--window", "3", "--shutdown-grace", "1") as gw,  # chat: 2 of 3
        httpx.AsyncClient(base_url=gw.url, timeout=15) as c,
        httpx.AsyncClient(base_url=gw.url, timeout=15) as c2,
        httpx.AsyncClient(base_url=gw.url, timeout=15) as c3,
    ):
        events: list[str] = []
        stream = asyncio.create_task(open_stream(c, events))
        await until(lambda: asyncio.sleep(0, len(events) >= 2))
        in_flight = asyncio.create_task(c2.post("/v1/chat/completions", json=CHAT))
        await until(lambda: asyncio.sleep(0, fake.running == 2))
        queued = asyncio.create_task(c3.post("/v1/chat/completions", json=CHAT))
        await until(lambda: queue_depth(c))

        sigterm = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert_shutting_down(await queued)
        cut = await in_flight  # its answer had not started: a status can still say why
        assert_shutting_down(cut)
        assert 0.9 < time.monotonic() - sigterm < 4.0  # the grace (1 s), not at once
        await stream
        async with asyncio.timeout(1 + 5):
            assert await gw.proc.wait() == 0

    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("shutting_down", "service_unavailable")
    assert 2 < len(events) < 10  # some words, then the cut
    await until(lambda: asyncio.sleep(0, fake.running == 0))
    assert (fake.aborted, fake.finished, len(fake.seen)) == (2, 0, 2)
    log = "\n".join(gw.log)
    assert "Traceback" not in log
    assert "timeout graceful shutdown exceeded" not in log  # the drain did it, not uvicorn


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_bad_grace_period_is_refused(grace: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.settings import parse_settings

    with pytest.raises(SystemExit):
        parse_settings(["--shutdown-grace", grace], env={})
    assert "shutdown-grace" in capsys.readouterr().err


def test_the_grace_period_comes_from_the_flag_or_the_environment() -> None:
    from gateway.settings import parse_settings

    assert parse_settings([], env={}).shutdown_grace_s == 30.0
    assert parse_settings([], env={"GATEWAY_SHUTDOWN_GRACE": "5"}).shutdown_grace_s == 5.0
    flag = parse_settings(["--shutdown-grace", "0.5"], env={"GATEWAY_SHUTDOWN_GRACE": "5"})
    assert flag.shutdown_grace_s == 0.5

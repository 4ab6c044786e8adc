"""Upstreams that come and go, in a real ``python -m gateway`` process.

The claim is about the gateway (its upstreams file, health checks, drain and metrics), not
about vLLM, so the upstreams are the unit tier's fake vLLM, served from this test's process
(each records the requests it gets). One gateway process starts with one upstream in its
file; a second is appended and found by mtime polling; after its health check both serve;
then the one running a slow stream is removed (SIGHUP): the stream completes, new requests
go only to the other, and the removed one's metric series disappear.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from gateway.upstreams import upstream_name
from tests.fake_vllm import FakeVllm
from tests.servers import stop_process, until_up
from tests.vllm_server import OUTPUT, ROOT, free_port

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def listing(path: Path, *urls: str) -> None:
    path.write_text("".join(f'[[upstream]]\nurl = "{url}"\n' for url in urls))


@asynccontextmanager
async def gateway(upstreams_file: Path) -> AsyncIterator[tuple[str, int]]:
    """The gateway as its own process; yields its URL and PID (for SIGHUP), stops it after."""
    log = OUTPUT / "gateway-upstreams-file.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = ["--upstreams-file", str(upstreams_file), "--health-interval", "0.3"]
    # Two slots per upstream: four slow requests at once must use both, whatever the routing.
    args += ["--window", "2", "--window-mode", "fixed", "--access-log", "off"]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), *args,
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await until_up(f"http://127.0.0.1:{port}/ready", process, log, timeout_s=60)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        await stop_process(process)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Poll an async predicate until it holds."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.1)


async def test_an_added_upstream_serves_and_a_removed_one_drains(tmp_path: Path) -> None:
    first, second = FakeVllm(), FakeVllm()
    await first.start()
    await second.start()
    listed = tmp_path / "upstreams.toml"
    listing(listed, first.url)
    names = {upstream_name(first.url): first, upstream_name(second.url): second}
    try:
        async with gateway(listed) as (url, pid), httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def states() -> dict[str, str]:
                upstreams = (await c.get("/ready")).json()["upstreams"]
                return {name: u["state"] for name, u in upstreams.items()}

            # Added: found by mtime polling (no signal), used once its health check passed.
            listing(listed, first.url, second.url)

            async def both_up() -> bool:
                return await states() == dict.fromkeys(names, "up")

            await until(both_up)
            for fake in names.values():
                fake.behaviour.first_token_delay_s = 0.5
            answers = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=CHAT) for _ in range(4))
            )
            assert [r.status_code for r in answers] == [200] * 4
            assert (len(first.seen), len(second.seen)) == (2, 2)

            # Removed (SIGHUP) while a slow stream runs on it.
            reply = "one two three four five six seven eight nine ten"
            for fake in names.values():  # a stream of about 4 s
                fake.behaviour.first_token_delay_s = 0.0
                fake.behaviour.chunk_delay_s = 0.4
                fake.behaviour.reply = reply
            stream_body = {**CHAT, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=stream_body) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break  # the first event: the request runs upstream
                busy = [name for name, fake in names.items() if fake.running]
                assert len(busy) == 1
                (removed,) = busy
                kept = next(name for name in names if name != removed)
                names[kept].behaviour.chunk_delay_s = 0.0
                listing(listed, names[kept].url)
                os.kill(pid, signal.SIGHUP)

                async def draining() -> bool:
                    return (await states()).get(removed) == "draining"

                await until(draining, 5)
                before = len(names[removed].seen)
                for _ in range(3):
                    r = await c.post("/v1/chat/completions", json=CHAT)
                    assert r.status_code == 200
                assert len(names[removed].seen) == before  # new work went to the other only
                events = [line async for line in lines if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            content = "".join(
                (json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for e in events[:-1]
            )
            assert "error" not in "".join(events)
            assert content.split() == reply.split()  # all of it, after the removal

            async def forgotten() -> bool:
                text = (await c.get("/metrics")).text
                return f'upstream="{removed}"' not in text and removed not in await states()

            await until(forgotten, 10)
            text = (await c.get("/metrics")).text
            assert f'gateway_upstream_up{{upstream="{kept}"}} 1.0' in text
    finally:
        await first.stop()
        await second.stop()

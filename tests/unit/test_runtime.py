"""Hot reload of the task table on SIGHUP, while requests are in flight."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.config import ConfigError
from gateway.settings import Settings
from tests.fake_vllm import FakeVllm
from tests.support import metric
from tests.unit.conftest import GatewayFactory

TABLE = """
[tasks.alpha]
class = "standard"
system_prompt = "first prompt"
"""


async def test_sighup_reloads_the_table_and_refuses_an_invalid_one(
    start_gateway: GatewayFactory, fake: FakeVllm, tmp_path: Path
) -> None:
    table = tmp_path / "tasks.toml"
    table.write_text(TABLE)
    fake.behaviour.first_token_delay_s = 0.5
    async with (
        start_gateway(tasks_path=table) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        in_flight = asyncio.create_task(
            c.post(
                "/v1/chat/completions",
                json={"model": "alpha", "messages": [{"role": "user", "content": "x"}]},
            )
        )
        while not fake.seen:
            await asyncio.sleep(0.01)
        table.write_text(
            TABLE.replace("first prompt", "second prompt") + '\n[tasks.beta]\nclass = "batch"\n'
        )
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for_task(c, "beta")
        assert (await in_flight).status_code == 200  # the request in flight kept its table
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200
        assert fake.seen[-1].body["messages"][0]["content"] == "second prompt"

        table.write_text('[tasks.alpha]\nclass = "urgent"\n')  # invalid: unknown class
        refused = 'gateway_task_table_reloads_total{result="refused"}'
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(5):  # the handler ran and refused the table
            while await metric(c, refused) != 1:
                await asyncio.sleep(0.02)
        models = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert models == {"alpha", "beta"}
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "beta", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200


async def wait_for_task(c: httpx.AsyncClient, name: str) -> None:
    async with asyncio.timeout(5):
        while name not in {m["id"] for m in (await c.get("/v1/models")).json()["data"]}:
            await asyncio.sleep(0.02)


async def test_sighup_also_reloads_the_upstreams_file(
    start_gateway: GatewayFactory, fake: FakeVllm, tmp_path: Path
) -> None:
    other = FakeVllm()
    await other.start()
    listed = tmp_path / "upstreams.toml"
    listed.write_text(f'[[upstream]]\nurl = "{fake.url}"\n')
    try:
        # A minute between polls: only the signal can make the gateway see the change soon.
        async with (
            start_gateway(upstreams=(), upstreams_file=listed, health_interval_s=60.0) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as c,
        ):
            listed.write_text(
                f'[[upstream]]\nurl = "{fake.url}"\n[[upstream]]\nurl = "{other.url}"\n'
            )
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                while len((await c.get("/ready")).json()["upstreams"]) != 2:
                    await asyncio.sleep(0.02)
            assert await metric(c, 'gateway_upstreams_file_reloads_total{result="ok"}') == 1
            listed.write_text("[[upstream]]\nurl = 'http://127.0.0.1:1'\nport = 1\n")
            os.kill(os.getpid(), signal.SIGHUP)
            refused = 'gateway_upstreams_file_reloads_total{result="refused"}'
            async with asyncio.timeout(5):
                while await metric(c, refused) != 1:
                    await asyncio.sleep(0.02)
            assert len((await c.get("/ready")).json()["upstreams"]) == 2  # the set was kept
    finally:
        await other.stop()


def test_an_invalid_upstreams_file_stops_the_start(tmp_path: Path) -> None:
    listed = tmp_path / "upstreams.toml"
    listed.write_text('[[upstream]]\ndns = "vllm"\n')
    with pytest.raises(ConfigError, match="upstream #1: port is required with dns"):
        create_app(Settings(upstreams_file=listed))

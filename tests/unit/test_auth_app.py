"""API keys and tenant limits through the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_key
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[tenants.limited]
keys = ["{hash_key("sk-limited")}"]
tasks = ["chat", "batch"]
max_class = "standard"
requests_per_s = 2
max_concurrent = 1

[tenants.full]
keys = ["{hash_key("sk-full")}"]
"""
    )
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_once_configured(
    start_gateway: GatewayFactory, keys_file: Path
) -> None:
    async with start_gateway(keys_path=keys_file) as url, httpx.AsyncClient(base_url=url) as c:
        body = {"model": "chat", "messages": USER}
        missing = await c.post("/v1/chat/completions", json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert (
            await c.post("/v1/chat/completions", json=body, headers=auth("sk-wrong"))
        ).status_code == 401
        assert (
            await c.post("/v1/chat/completions", json=body, headers=auth("sk-full"))
        ).status_code == 200
        assert (await c.get("/health")).status_code == 200  # operators' endpoints stay open


async def test_tasks_and_classes_beyond_the_key_are_refused_or_capped(
    start_gateway: GatewayFactory, keys_file: Path, fake: FakeVllm
) -> None:
    async with start_gateway(keys_path=keys_file) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "sentiment", "messages": USER},
            headers=auth("sk-limited"),
        )
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "task_not_allowed"
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": USER},
            headers={**auth("sk-limited"), "X-Priority": "interactive"},
        )
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "class_not_allowed"
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": USER},
            headers=auth("sk-limited"),
        )
        assert r.status_code == 200
        assert r.headers["x-priority-class"] == "standard"  # chat is interactive; the key caps it
        assert fake.seen[-1].body["priority"] == -80


async def test_request_rate_and_concurrency_limits(
    start_gateway: GatewayFactory, keys_file: Path, fake: FakeVllm
) -> None:
    async with start_gateway(keys_path=keys_file) as url, httpx.AsyncClient(base_url=url) as c:
        body = {"model": "chat", "messages": USER}
        # 2 requests per second, burst 2: two quick requests pass, the third is refused.
        for _ in range(2):
            assert (
                await c.post("/v1/chat/completions", json=body, headers=auth("sk-limited"))
            ).status_code == 200
        limited = await c.post("/v1/chat/completions", json=body, headers=auth("sk-limited"))
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        other = await c.post("/v1/chat/completions", json=body, headers=auth("sk-full"))
        assert other.status_code == 200  # one tenant's limits are not another's

        await asyncio.sleep(1.1)  # the bucket refills
        fake.behaviour.first_token_delay_s = 0.5
        first = asyncio.create_task(
            c.post("/v1/chat/completions", json=body, headers=auth("sk-limited"))
        )
        while len(fake.seen) < 4:
            await asyncio.sleep(0.01)
        busy = await c.post("/v1/chat/completions", json=body, headers=auth("sk-limited"))
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "concurrency"
        assert (await first).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert (
            'gateway_rejections_total{priority_class="standard",reason="rate_limited"} 1.0'
            in metrics
        )
        assert (
            'gateway_rejections_total{priority_class="standard",reason="concurrency"} 1.0'
            in metrics
        )


async def test_a_flooding_tenant_does_not_starve_another(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 0.3
    async with (
        start_gateway(window=1, env_keys="flood:sk-flood,polite:sk-polite") as url,
        httpx.AsyncClient(base_url=url, timeout=60) as c,
    ):

        def send(key: str, text: str) -> asyncio.Task[httpx.Response]:
            body = {"model": "batch", "messages": [{"role": "user", "content": text}]}
            return asyncio.create_task(c.post("/v1/chat/completions", json=body, headers=auth(key)))

        flood = [send("sk-flood", "flood") for _ in range(12)]
        async with asyncio.timeout(10):
            while await queued(c) < 9:
                await asyncio.sleep(0.01)
        polite = [send("sk-polite", "polite") for _ in range(3)]
        responses = await asyncio.gather(*flood, *polite)
    assert all(r.status_code == 200 for r in responses)
    assert all("Authorization" not in s.headers for s in fake.seen)  # keys stay in the gateway
    order = [s.body["messages"][-1]["content"] for s in fake.seen]
    polite_at = [i for i, text in enumerate(order) if text == "polite"]
    # Round robin: with the flooder's backlog still queued, the polite tenant gets every
    # other slot instead of waiting behind the whole flood.
    assert polite_at[1] - polite_at[0] == 2, order
    assert polite_at[2] - polite_at[1] == 2, order
    assert polite_at[-1] < len(order) - 3, order


async def queued(c: httpx.AsyncClient) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith('gateway_queue_depth{priority_class="batch"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no queue depth")

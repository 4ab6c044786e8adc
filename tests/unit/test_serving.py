"""Serving one task step: input budgets, timeouts and failover, through the app on a socket."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from gateway.config import load_config
from tests.fake_vllm import FakeVllm
from tests.support import assert_envelope, metric
from tests.unit.conftest import GatewayFactory

LONG = [{"role": "user", "content": "word " * 200}]  # 1,000 bytes: must be counted


def small_budget() -> object:
    config = load_config()
    chat = dataclasses.replace(config.tasks["chat"], max_input_tokens=500)
    return dataclasses.replace(config, tasks={**config.tasks, "chat": chat})


async def test_counting_the_input_runs_inside_the_requests_deadline(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.tokenize_hang = True
    async with start_gateway(small_budget()) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": LONG},
            headers={"X-Request-Deadline-Ms": "800"},
            timeout=5,
        )
        assert_envelope(r, 504, "deadline_exceeded")


async def test_a_failed_count_is_the_upstreams_failure_and_fails_over(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    other = FakeVllm()
    await other.start()
    try:
        fake.behaviour.tokenize_status = 500
        async with (
            start_gateway(small_budget(), upstreams=(fake.url, other.url)) as url,
            httpx.AsyncClient(base_url=url) as c,
        ):
            r = await c.post(
                "/v1/chat/completions", json={"model": "chat", "messages": LONG}, timeout=5
            )
            assert_envelope(r, 400, "input_too_long")  # counted by the other upstream
            assert other.tokenize_calls == 1
    finally:
        await other.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_silent_upstream_is_a_timeout_not_unavailable(
    start_gateway: GatewayFactory, fake: FakeVllm, stream: bool
) -> None:
    """Non-streaming calls are bounded by the read gap too (not by the task's deadline), and
    aiohttp's read timeout, which is also a connection error, is still a 504."""
    fake.behaviour.hang = True
    async with start_gateway(read_timeout_s=0.5) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": "chat",
                "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
            },
            timeout=5,
        )
        assert_envelope(r, 504, "upstream_timeout")


def bare_batch() -> object:
    """The shipped table with batch's system prompt empty: the prompt estimate is then the
    user's text alone (1 token for 4 bytes), below the fake's count of 7."""
    config = load_config()
    batch = dataclasses.replace(config.tasks["batch"], system_prompt="")
    return dataclasses.replace(config, tasks={**config.tasks, "batch": batch})


SERVICE = 'gateway_tenant_service_tokens_total{priority_class="batch",tenant="acme"}'


async def test_a_tenant_is_charged_its_tokens_while_they_stream_and_exactly_at_the_end(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.reply = " ".join(["w"] * 40)
    fake.behaviour.chunk_delay_s = 0.01
    body = {"model": "batch", "messages": [{"role": "user", "content": "hi!!"}], "stream": True}
    auth = {"Authorization": "Bearer sk-acme"}
    async with (
        start_gateway(bare_batch(), env_keys="acme:sk-acme") as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
    ):
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            words = 0
            async for line in r.aiter_lines():
                words += line.count('"content":"w"') + line.count('"content":" w"')
                if words == 20:  # halfway: what streamed so far is charged already
                    during = await metric(c, SERVICE)
        assert 1 + 2 * 16 <= during < 7 + 2 * 40
        assert await metric(c, SERVICE) == 7 + 2 * 40  # usage: 7 prompt, 40 generated
        del body["stream"]
        assert (await c.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
        assert await metric(c, SERVICE) == 2 * (7 + 2 * 40)  # collected answers too
        assert await metric(c, 'gateway_fairness_index{priority_class="batch"}') == 1.0
        classes = (await c.get("/status.json")).json()["queue"]["classes"]
        assert {k["name"]: k["shares"] for k in classes}["batch"] == {"acme": 1.0}


async def test_without_keys_nothing_is_counted(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    async with start_gateway() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        body = {"model": "batch", "messages": [{"role": "user", "content": "hi"}]}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert "gateway_tenant_service_tokens_total{" not in (await c.get("/metrics")).text

"""Serving one task step: input budgets, timeouts and failover, through the app on a socket."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from gateway.config import load_config
from tests.fake_vllm import FakeVllm
from tests.support import assert_envelope
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

"""Input budgets through the gateway; the fake upstream counts one token per character."""

from __future__ import annotations

import httpx

from gateway.config import parse_config
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

TABLE = {
    "tasks": {
        "strict": {"class": "standard", "max_input_tokens": 100},
        "trim": {"class": "standard", "max_input_tokens": 100, "truncate_input": True},
    }
}


def ask(task: str, text: str, *history: dict[str, str]) -> dict[str, object]:
    return {"model": task, "messages": [*history, {"role": "user", "content": text}]}


async def test_inputs_within_budget_cost_no_tokenize_call(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    async with start_gateway(parse_config(TABLE)) as url, httpx.AsyncClient(base_url=url) as c:
        assert (
            await c.post("/v1/chat/completions", json=ask("strict", "x" * 100))
        ).status_code == 200
    assert fake.tokenize_calls == 0


async def test_over_budget_is_400_unless_the_task_truncates(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    async with start_gateway(parse_config(TABLE)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", json=ask("strict", "x" * 101))
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "input_too_long"
        assert "101 tokens" in r.json()["error"]["message"]
        assert len(fake.seen) == 0  # refused before it reached the model


async def test_truncation_keeps_the_beginning_and_the_end(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    text = "BEGIN" + "m" * 500 + "END"
    async with start_gateway(parse_config(TABLE)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions", json=ask("trim", text, {"role": "system", "content": "ctx"})
        )
        assert r.status_code == 200
        assert r.headers["x-input-truncated"].startswith("tokens=512->")  # "ctx" + newline + 508
    sent = fake.seen[-1].body["messages"][-1]["content"]
    assert sent.startswith("BEGIN")
    assert sent.endswith("END")
    assert "[…]" in sent
    assert len(sent) <= 100


async def test_multibyte_text_is_counted_in_tokens_not_bytes(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    async with start_gateway(parse_config(TABLE)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions", json=ask("strict", "好" * 90)
        )  # 270 bytes, 90 tokens here
        assert r.status_code == 200
    assert fake.tokenize_calls == 1

"""The gateway over real sockets, in front of the fake vLLM: routing, shaping, errors, headers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway.metrics import OUTCOMES
from tests.fake_vllm import FakeVllm
from tests.support import assert_envelope
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "I love this phone"}]


async def test_sentiment_is_shaped_by_its_task(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "sentiment", "messages": USER})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "positive"
    sent = fake.seen[-1].body
    assert sent["structured_outputs"] == {"choice": ["positive", "negative"]}
    assert sent["priority"] == -100  # realtime, converted to vLLM's lower-first scale
    assert sent["max_tokens"] == 10
    assert sent["messages"][0]["role"] == "system"
    assert sent["model"] == fake.model


async def test_every_response_has_request_id_and_server_timing(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER},
        headers={"X-Request-Id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert fake.seen[-1].headers["X-Request-Id"] == "abc-123"  # passed on to vLLM
    timing = r.headers["server-timing"]
    assert "queue;dur=" in timing
    assert "upstream;dur=" in timing
    assert "total;dur=" in timing
    for response in (
        await client.get("/health"),
        await client.get("/no/such/path"),
        await client.post("/v1/chat/completions", content=b"{"),
        await client.get("/v1/chat/completions"),
    ):
        assert response.headers["x-request-id"]
        assert "total;dur=" in response.headers["server-timing"]
    weird = await client.post(
        "/v1/chat/completions", json={}, headers={"X-Request-Id": "bad id\twith spaces"}
    )
    assert weird.headers["x-request-id"] != "bad id\twith spaces"


async def test_task_from_x_task_header_wins_over_model(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": USER},
        headers={"X-Task": "sentiment"},
    )
    assert r.status_code == 200
    assert r.headers["x-task"] == "sentiment"


async def test_unknown_task_is_404_naming_the_valid_tasks(client: httpx.AsyncClient) -> None:
    error = assert_envelope(
        await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": USER}),
        404,
        "model_not_found",
    )
    assert "sentiment" in error["message"]
    assert "chat" in error["message"]
    assert_envelope(await client.post("/v1/chat/completions", json={"messages": USER}), 404)


async def test_x_priority_lowers_but_never_raises(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER},
        headers={"X-Priority": "batch"},
    )
    assert r.headers["x-priority-class"] == "batch"
    assert fake.seen[-1].body["priority"] == -10
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "batch", "messages": USER},
        headers={"X-Priority": "realtime"},
    )
    assert r.headers["x-priority-class"] == "batch"
    assert fake.seen[-1].body["priority"] == -10
    assert_envelope(
        await client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": USER},
            headers={"X-Priority": "urgent"},
        ),
        400,
    )


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{broken", 400),
        (b"[]", 400),
        (b'{"model": "chat", "messages": "hi"}', 400),
        (
            b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
        ),
        (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 3}', 400),
        (b'{"model": 42, "messages": []}', 404),
        (b"\xff\xff", 400),
    ],
)
async def test_bad_input_is_a_4xx_envelope(
    client: httpx.AsyncClient, body: bytes, status: int
) -> None:
    assert_envelope(await client.post("/v1/chat/completions", content=body), status)


async def test_oversized_body_is_413(start_gateway: GatewayFactory) -> None:
    async with start_gateway(max_body_bytes=1000) as url, httpx.AsyncClient(base_url=url) as c:
        big = {"model": "chat", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_envelope(await c.post("/v1/chat/completions", json=big), 413, "body_too_large")


async def test_stream_is_relayed_event_by_event(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    fake.behaviour.hold_after_first = gate = asyncio.Event()
    async with client.stream(
        "POST", "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": USER}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "ttft;dur=" in r.headers["server-timing"]
        events = []
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            if '"content":"Hello"' in line:
                gate.set()  # the fake only continues once we have the first token
    assert events[-1] == "data: [DONE]"
    text = "".join(
        json.loads(e[6:])["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
        if e.startswith("data: {")
    )
    assert text == "Hello there friend"


async def test_usage_chunk_only_when_the_client_asks(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    body = {"model": "chat", "stream": True, "messages": USER}
    plain = (await client.post("/v1/chat/completions", json=body)).text
    assert '"usage":{' not in plain
    assert fake.seen[-1].body["stream_options"] == {"include_usage": True}  # asked upstream anyway
    with_usage = (
        await client.post(
            "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
        )
    ).text
    assert '"usage":{' in with_usage
    assert with_usage.rstrip().endswith("data: [DONE]")


async def test_completions_endpoint(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "code", "prompt": "def add(a, b):", "max_tokens": 2}
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "Hello there"
    assert fake.seen[-1].body["prompt"].endswith("def add(a, b):")


async def test_assist_returns_label_and_reply(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "assist", "messages": USER})
    assert r.status_code == 200
    assert r.headers["x-sentiment"] == "positive"
    assert r.json()["sentiment"] == "positive"
    label_call, reply_call = fake.seen[-2].body, fake.seen[-1].body
    assert label_call["priority"] == -100  # the label step runs at realtime
    assert "structured_outputs" in label_call
    assert "classified as positive" in reply_call["messages"][0]["content"]
    assert reply_call["priority"] == -90
    stream = await client.post(
        "/v1/chat/completions", json={"model": "assist", "messages": USER, "stream": True}
    )
    first = next(line for line in stream.text.splitlines() if line.startswith("data: {"))
    assert json.loads(first[6:])["sentiment"] == "positive"


async def test_upstream_errors_map_to_statuses(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    body = {"model": "chat", "messages": USER}
    fake.behaviour.status = 400
    error = assert_envelope(await client.post("/v1/chat/completions", json=body), 400)
    assert "fake error 400" in error["message"]
    fake.behaviour.status = 500
    assert_envelope(await client.post("/v1/chat/completions", json=body), 502, "upstream_error")
    fake.behaviour.status = 200
    fake.behaviour.garbage = True
    assert_envelope(
        await client.post("/v1/chat/completions", json=body), 502, "bad_upstream_response"
    )
    assert_envelope(await client.post("/v1/chat/completions", json={**body, "stream": True}), 502)


async def test_stream_broken_by_upstream_ends_with_in_band_error(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.break_after_chunks = 1
    r = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER, "stream": True}
    )
    assert r.status_code == 200
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["type"] in ("upstream_error", "timeout_error")


async def test_upstream_down_is_503_and_not_ready(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    async with start_gateway() as url, httpx.AsyncClient(base_url=url) as c:
        await fake.stop()
        r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        assert_envelope(r, 503)
        for _ in range(50):  # the health loop notices within its interval (0.2 s here)
            if (await c.get("/ready")).status_code == 503:
                break
            await asyncio.sleep(0.05)
        ready = await c.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert_envelope(
            await c.post("/v1/chat/completions", json={"model": "chat", "messages": USER}), 503
        )


async def test_models_health_ready_metrics(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} >= {"sentiment", "chat", "assist"}
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    await client.post("/v1/chat/completions", json={"model": "sentiment", "messages": USER})
    text = (await client.get("/metrics")).text
    for name in (
        "gateway_requests_total",
        "gateway_queue_wait_seconds_bucket",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_request_duration_seconds_bucket",
        "gateway_queue_depth",
        "gateway_inflight_requests",
        "gateway_rejections_total",
        "gateway_deadline_exceeded_total",
        "gateway_upstream_up",
        "gateway_priority_boosts_total",
    ):
        assert name in text
    assert (
        'gateway_requests_total{outcome="ok",priority_class="realtime",task="sentiment"} 1.0'
        in text
    )
    for outcome in OUTCOMES:  # pre-initialised: dashboards see zeros, not gaps
        assert (
            f'gateway_requests_total{{outcome="{outcome}",priority_class="batch",task="batch"}}'
            in text
        )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_one_model_is_the_tasks_entry(client: httpx.AsyncClient) -> None:
    chat = (await client.get("/v1/models/chat")).json()
    assert (chat["id"], chat["object"], chat["tools"]) == ("chat", "model", True)
    assert (await client.get("/v1/models/sentiment")).json()["labels"] == ["positive", "negative"]
    error = assert_envelope(await client.get("/v1/models/gpt-4o"), 404, "model_not_found")
    assert "valid tasks" in error["message"]


async def test_tools_reach_vllm_only_through_tasks_that_take_them(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    body = {"model": "chat", "messages": USER, "tools": [WEATHER], "tool_choice": "auto"}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert fake.seen[-1].body["tools"] == [WEATHER]
    assert fake.seen[-1].body["tool_choice"] == "auto"
    seen = len(fake.seen)
    for task in ("sentiment", "summarize", "assist"):
        r = await client.post("/v1/chat/completions", json={**body, "model": task})
        error = assert_envelope(r, 400, "unsupported_parameter")
        assert error["param"] == "tools"
    labelled = {"model": "sentiment", "messages": USER, "response_format": {"type": "json_object"}}
    assert_envelope(await client.post("/v1/chat/completions", json=labelled), 400)
    assert len(fake.seen) == seen  # nothing refused reached vLLM

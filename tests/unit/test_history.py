"""The status page's time series: bounded whatever the uptime, sampled with an injected clock,
and served by /status.json (all of it, or what came after ``since``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.auth import KeyRing
from gateway.config import load_config
from gateway.history import History, Sampler
from gateway.runtime import Runtime, build_runtime, close_runtime
from gateway.settings import Settings
from gateway.upstreams import upstream_name
from tests.fake_vllm import FakeVllm
from tests.servers import running_gateway

USER = [{"role": "user", "content": "I love this phone"}]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    settings = Settings(upstreams=("http://127.0.0.1:9",), window_mode="fixed", access_log=False)
    rt = build_runtime(settings, load_config(), CollectorRegistry(), KeyRing({}, []))
    yield rt
    await close_runtime(rt)


def test_history_keeps_only_its_span() -> None:
    history = History(interval_s=2.0, span_s=600.0)
    assert history.max_points == 300
    for i in range(10_000):  # 5.5 hours of points
        history.add({"t": float(i)})
    assert len(history) == 300
    points = history.since(None)
    assert (points[0]["t"], points[-1]["t"]) == (9700.0, 9999.0)
    assert [p["t"] for p in history.since(9996.0)] == [9997.0, 9998.0, 9999.0]
    assert history.since(9999.0) == []
    assert len(history.since(-1.0)) == 300  # older than the ring: all of it
    with pytest.raises(ValueError, match="interval_s"):
        History(interval_s=0.0)


async def test_sampler_points_are_bounded_and_read_what_the_gateway_keeps(
    runtime: Runtime,
) -> None:
    clock = Clock()
    history = History(interval_s=2.0, span_s=20.0, trailing_s=30.0)
    sampler = Sampler(runtime.status, runtime.metrics, history, clock)
    metrics, upstream = runtime.metrics, upstream_name("http://127.0.0.1:9")
    assert metrics.on_request is not None
    # Ten sentiment answers finishing over the last 10 s, one older than the trailing window.
    metrics.on_request("sentiment", "ok", clock.now - 40, 9.0, None, None)
    for i in range(10):
        metrics.on_request("sentiment", "ok", clock.now - 9 + i, 0.1 * (i + 1), None, None)
    metrics.on_request("chat", "ok", clock.now, 2.0, 0.5, None)
    metrics.on_request("chat", "rejected", clock.now, 0.001, None, "queue_full")  # not served
    clock.now += 2.0
    for _ in range(6):
        metrics.rejections.labels("batch", "class_queue_full").inc()
    metrics.rejections.labels("realtime", "rate_limited").inc()
    metrics.deadline_exceeded.labels("chat", "queue").inc(2)
    metrics.preemptions.labels("batch").inc()
    sampler.sample()

    [point] = history.since(None)
    assert point["t"] == 1002.0
    assert point["queue"] == {
        "realtime": 0, "interactive": 0, "standard": 0, "batch": 0, "background": 0,
    }  # fmt: skip
    assert point["upstreams"] == {upstream: {"inflight": 0, "window": 8}}
    assert point["latency_p95_s"]["sentiment"] == 1.0  # nearest rank of 0.1 .. 1.0; not 9.0
    assert point["latency_p95_s"]["chat"] == 2.0
    assert point["ttft_p95_s"]["chat"] == 0.5
    assert point["latency_p95_s"]["code"] is None
    assert point["rejections"]["class_queue_full"] == 3.0  # 6 in 2 s
    assert point["rejections"]["rate_limited"] == 0.5
    assert point["rejections"]["queue_full"] == 0.0
    assert point["deadlines"] == {"queue": 1.0, "dispatch": 0.0, "upstream": 0.0}
    assert point["preemptions"]["batch"] == 0.5

    clock.now += 40.0  # the trailing window has moved past every answer; no new refusals
    sampler.sample()
    latest = history.since(1002.0)[0]
    assert latest["latency_p95_s"]["sentiment"] is None
    assert latest["rejections"]["class_queue_full"] == 0.0

    for _ in range(1000):  # an hour and more of sampling: the ring stays at its bound
        clock.now += 2.0
        sampler.sample()
    assert len(history) == history.max_points == 10
    assert history.since(None)[0]["t"] == clock.now - 18.0


async def test_status_json_serves_the_history_and_models_their_slas(fake: FakeVllm) -> None:
    settings = Settings(upstreams=(fake.url,), window_mode="fixed", access_log=False)
    history = History(interval_s=0.05, span_s=1.0)
    async with (
        running_gateway(settings, history=history) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as c,
    ):
        r = await c.post("/v1/chat/completions", json={"model": "sentiment", "messages": USER})
        assert r.status_code == 200
        async with asyncio.timeout(10):  # the sampler fills the ring, then holds it there
            while len(history) < history.max_points:
                await c.get("/status.json")
        body = (await c.get("/status.json")).json()
        series = body["history"]
        assert (series["interval_s"], series["span_s"], series["max_points"]) == (0.05, 1.0, 20)
        assert len(series["points"]) == 20
        assert body["bounds"]["history"] == {"max_points": 20, "kept": 20}
        last = series["points"][-3]["t"]
        newer = (await c.get("/status.json", params={"since": last})).json()["history"]
        assert [p["t"] for p in newer["points"]][:2] == [p["t"] for p in series["points"][-2:]]
        assert all(p["t"] > last for p in newer["points"])
        bad = await c.get("/status.json", params={"since": "yesterday"})
        assert bad.status_code == 400

        models = (await c.get("/v1/models")).json()
        assert models["auth_required"] is False
        entry = next(m for m in models["data"] if m["id"] == "sentiment")
        assert (entry["sla_latency_s"], entry["sla_ttft_s"]) == (2.0, 2.0)
        assert (await c.get("/v1/models/chat")).json()["sla_ttft_s"] == 3.0

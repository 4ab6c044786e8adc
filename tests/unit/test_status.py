"""The status page: /status.json after real traffic through the fake, and the page itself."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.auth import KeyRing
from gateway.config import Config, default_config_path, load_config, parse_config
from gateway.runtime import build_runtime, close_runtime
from gateway.settings import Settings
from gateway.status import Recent, percentile
from gateway.upstreams import upstream_name
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "I love this phone"}]


def small_batch_queue() -> Config:
    """The shipped task table with room for two waiting batch requests."""
    raw = tomllib.loads(default_config_path().read_text())
    raw["classes"]["batch"]["max_queued"] = 2
    return parse_config(raw)


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) is None


def test_recent_is_bounded_and_forgets_by_age() -> None:
    recent = Recent(per_task=3, horizon_s=10.0)
    for at in range(5):
        recent.add("chat", "ok", float(at), 1.0 + at, None, None)
    assert [f.at for f in recent.window("chat", now=5.0)] == [2.0, 3.0, 4.0]
    assert [f.at for f in recent.window("chat", now=13.5)] == [4.0]
    assert recent.window("chat", now=100.0) == []
    assert recent.window("never-seen", now=0.0) == []
    assert recent.kept() == {"chat": 3}  # the bound, whatever the age


async def test_status_json_after_traffic(start_gateway: GatewayFactory, fake: FakeVllm) -> None:
    fake.behaviour.reply = "one two three four five"
    fake.behaviour.chunk_delay_s = 0.05  # a chat answer takes ~0.2 s, its first token ~0
    async with (
        start_gateway(small_batch_queue(), window=1, health_interval_s=0.05) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        for _ in range(5):
            r = await c.post("/v1/chat/completions", json={"model": "sentiment", "messages": USER})
            assert r.status_code == 200
        for _ in range(3):
            r = await c.post(
                "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": USER}
            )
            assert r.status_code == 200

        # Now fill the window and the batch queue, and have one more batch request turned away.
        fake.behaviour.first_token_delay_s = 30
        pending = [
            asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
            )
            for _ in range(3)
        ]

        async def queued_two() -> bool:
            status = (await c.get("/status.json")).json()
            return bool(by_name(status["queue"]["classes"])["batch"]["depth"] == 2)

        await until(queued_two)
        r = await c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
        assert r.status_code == 429

        async def vllm_sees_one() -> bool:
            status = (await c.get("/status.json")).json()
            vllm = status["upstreams"][0]["vllm"]
            return vllm is not None and vllm["running"] == 1.0

        await until(vllm_sees_one)
        r = await c.get("/status.json")
        assert r.headers["content-type"] == "application/json"
        status = r.json()

        queue = status["queue"]
        assert queue["queued"] == 2
        assert queue["max_queued"] == 512
        classes = by_name(queue["classes"])
        assert list(classes) == ["realtime", "interactive", "standard", "batch", "background"]
        # shares: tokens served per tenant over the last minute; none without keys
        assert classes["batch"] == {"name": "batch", "depth": 2, "max_queued": 2, "shares": {}}
        assert classes["realtime"]["depth"] == 0

        (upstream,) = status["upstreams"]
        assert upstream["name"] == upstream_name(fake.url)
        assert upstream["up"] is True
        assert upstream["model"] == fake.model
        # vLLM runs one request, and it is ours: no load from other clients.
        assert (upstream["inflight"], upstream["window"], upstream["external"]) == (1, 1, 0)
        assert upstream["vllm"]["waiting"] == 0.0
        assert upstream["vllm"]["kv_cache_usage"] == 0.1
        assert 0 <= upstream["vllm"]["age_s"] < 1.0
        assert upstream["metrics_error"] is None

        tasks = by_name(status["tasks"])
        assert set(tasks) == {
            "sentiment", "chat", "code", "summarize", "translate", "batch", "assist",
        }  # fmt: skip
        sentiment = tasks["sentiment"]
        assert sentiment["requests"] == 5
        assert sentiment["outcomes"] == {"ok": 5}
        assert sentiment["sla_latency_s"] == 2.0
        assert 0 < sentiment["latency_p50_s"] <= sentiment["latency_p95_s"] < 0.5
        assert sentiment["latency_ok"] is True
        assert sentiment["ttft_requests"] == 0  # not streamed: no time to first token
        assert sentiment["ttft_p95_s"] is None
        assert sentiment["ttft_ok"] is None

        chat = tasks["chat"]
        assert chat["requests"] == 3
        assert chat["ttft_requests"] == 3
        assert 0.2 <= chat["latency_p50_s"] <= chat["latency_p95_s"] < 1.5
        assert 0 < chat["ttft_p50_s"] <= chat["ttft_p95_s"] < chat["latency_p50_s"]
        assert (chat["latency_ok"], chat["ttft_ok"]) == (True, True)

        batch = tasks["batch"]
        assert batch["outcomes"] == {"rejected": 1}  # the three pending have not finished
        assert tasks["code"]["requests"] == 0
        assert tasks["code"]["latency_p95_s"] is None
        assert tasks["code"]["latency_ok"] is None

        # What is kept of past requests, against its bound (the soak waits for it to fill).
        assert status["bounds"]["recent"] == {
            "per_task": 2048,
            "kept": {"sentiment": 5, "chat": 3, "batch": 1},
        }

        rejections = status["rejections"]
        assert rejections["recent"]["class_queue_full"] == 1
        assert rejections["total"]["class_queue_full"] == 1
        assert sum(rejections["recent"].values()) == 1
        assert sum(rejections["total"].values()) == 1

        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


@pytest.mark.parametrize(
    ("path", "fetches"), [("/status", "status.json"), ("/playground", "v1/models")]
)
async def test_pages_are_self_contained_html(
    client: httpx.AsyncClient, path: str, fetches: str
) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<table" in page
    assert f'"{fetches}' in page  # relative, so the page works behind a path prefix
    # The SVG namespace is a name, not a fetch; the icon is an empty data: URL, so that the
    # browser asks for no /favicon.ico (outside a path prefix).
    page = page.replace('"http://www.w3.org/2000/svg"', "").replace(
        '<link rel="icon" href="data:,">', ""
    )
    # Nothing is fetched from elsewhere: no absolute or protocol-relative URLs at all.
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", page)
    assert not re.search(r"<(link|img|iframe)\b", page)
    assert not re.search(r"<script[^>]*\bsrc\b", page)
    assert "@import" not in page
    assert "url(" not in page
    assert not re.search(r"""fetch\(\s*["'`]/""", page)  # no absolute paths either


async def test_capacity_and_window_gauges(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    text = (await client.get("/metrics")).text
    name = upstream_name(fake.url)
    assert 'gateway_queue_capacity{priority_class="batch"} 256.0' in text
    assert 'gateway_queue_capacity{priority_class="realtime"} 64.0' in text
    assert f'gateway_window_size{{upstream="{name}"}} 4.0' in text
    assert 'gateway_task_table_reloads_total{result="ok"} 0.0' in text
    assert 'gateway_task_table_reloads_total{result="refused"} 0.0' in text


async def test_reloads_are_counted_and_capacity_follows_the_table(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    settings = Settings(upstreams=("http://127.0.0.1:9",), access_log=False)
    runtime = build_runtime(settings, load_config(), registry, KeyRing({}, []))
    try:

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("gateway_queue_capacity", priority_class="batch") == 256.0
        table = tmp_path / "tasks.toml"
        raw = default_config_path().read_text()
        table.write_text(raw.replace("max_queued = 256", "max_queued = 7", 1))
        assert runtime.reload(table) is True
        assert value("gateway_task_table_reloads_total", result="ok") == 1.0
        assert value("gateway_queue_capacity", priority_class="batch") == 7.0

        table.write_text(raw + "\n[tasks.broken]\nclass = 'nope'\n")
        assert runtime.reload(table) is False
        assert value("gateway_task_table_reloads_total", result="refused") == 1.0
        assert value("gateway_task_table_reloads_total", result="ok") == 1.0
        assert value("gateway_queue_capacity", priority_class="batch") == 7.0
    finally:
        await close_runtime(runtime)

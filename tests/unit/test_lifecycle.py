"""One owner per request: whatever ends a request, its slot, its tenant's count and its
record are released exactly once. Each test here reproduces a defect found in review."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.config import load_config
from gateway.settings import Settings
from tests.fake_vllm import FakeVllm
from tests.support import asgi_call, asgi_get, lifespan, metric, metric_value, until
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "I love this"}]


def settings(fake: FakeVllm, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "upstreams": (fake.url,),
        "window": 1,
        "window_mode": "fixed",
        "health_interval_s": 0.2,
        "access_log": False,
    }
    return Settings(**{**base, **changes})


async def ready(app: Any, state: dict[str, Any]) -> None:
    async with asyncio.timeout(5):
        while (await asgi_get(app, state, "/ready"))[0] != 200:
            await asyncio.sleep(0.02)


async def scraped(app: Any, state: dict[str, Any], prefix: str) -> float:
    return metric_value((await asgi_get(app, state, "/metrics"))[1].decode(), prefix)


async def test_a_stream_whose_client_leaves_before_its_body_starts_frees_its_slot(
    fake: FakeVllm,
) -> None:
    """The disconnect lands after the first upstream event has arrived and the answer's
    status line is being written, before any body went out (as when the socket's write
    buffer is full): the request's slot must come back all the same."""
    app = create_app(settings(fake))
    async with lifespan(app) as state:
        await ready(app, state)
        gone = asyncio.Event()
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                body = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                gone.set()  # the client leaves while the status line is being written
                for _ in range(5):
                    await asyncio.sleep(0)  # a write that has to wait for the socket

        await asgi_call(app, state, "POST", "/v1/chat/completions", receive=receive, send=send)
        inflight = f'gateway_inflight_requests{{upstream="127.0.0.1:{fake.url.rsplit(":", 1)[1]}"}}'
        assert await scraped(app, state, inflight) == 0
        cancelled = (
            'gateway_requests_total{outcome="cancelled",priority_class="interactive",task="chat"}'
        )
        assert await scraped(app, state, cancelled) == 1
        # and the window still works: the next request is served
        messages = await asgi_call(
            app, state, "POST", "/v1/chat/completions", {"model": "chat", "messages": USER}
        )
        assert messages[0]["status"] == 200


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[tenants.capped]
keys = ["{hash_key("sk-capped")}"]
max_class = "batch"
max_concurrent = 1
"""
    )
    return path


AUTH = {"Authorization": "Bearer sk-capped"}


async def test_a_request_that_fails_with_an_unexpected_error_is_recorded_and_released(
    start_gateway: GatewayFactory, keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything raised, not only the gateway's own errors, ends in one record and one release:
    the tenant's concurrency slot comes back, and the request is counted."""
    import gateway.calls

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("a bug in building the upstream body")

    monkeypatch.setattr(gateway.calls, "build_upstream_body", broken)
    async with start_gateway(keys_path=keys_file) as url, httpx.AsyncClient(base_url=url) as c:
        for _ in range(2):  # the tenant may have one request at a time: the first must end
            r = await c.post(
                "/v1/chat/completions", json={"model": "chat", "messages": USER}, headers=AUTH
            )
            assert r.status_code == 500, r.text
            assert r.json()["error"]["code"] == "internal_error"
        failed = (
            'gateway_requests_total{outcome="internal_error",priority_class="batch",task="chat"}'
        )
        assert await metric(c, failed) == 2


async def test_assist_runs_every_step_under_the_callers_class_ceiling(
    start_gateway: GatewayFactory, keys_file: Path, fake: FakeVllm
) -> None:
    async with start_gateway(keys_path=keys_file) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(
            "/v1/chat/completions", json={"model": "assist", "messages": USER}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        config = load_config()
        batch = config.classes["batch"]
        assert len(fake.seen) == 2
        from gateway.classes import to_vllm_priority

        # neither step ran above the key's class (aging can only make it better than batch's
        # own head start by the time it waited, which is ~0 here)
        for seen in fake.seen:
            assert seen.body["priority"] >= to_vllm_priority(batch.head_start_s) - 1
        served = [
            line
            for line in (await c.get("/metrics")).text.splitlines()
            if line.startswith("gateway_requests_total{") and not line.endswith(" 0.0")
        ]
        assert served == [
            'gateway_requests_total{outcome="ok",priority_class="batch",task="assist"} 1.0'
        ]


async def test_a_client_that_leaves_during_the_label_step_is_recorded_as_cancelled(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """One record for the request, saying what happened; the label step is not an ``ok``."""
    fake.behaviour.hang = True
    async with start_gateway() as url, httpx.AsyncClient(base_url=url) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post(
                "/v1/chat/completions", json={"model": "assist", "messages": USER}, timeout=0.5
            )

        async def recorded() -> dict[str, float]:
            text = (await c.get("/metrics")).text
            return {
                line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("gateway_requests_total{") and not line.endswith(" 0.0")
            }

        cancelled = (
            'gateway_requests_total{outcome="cancelled",priority_class="interactive",task="assist"}'
        )
        async with asyncio.timeout(5):
            while cancelled not in (seen := await recorded()):
                await asyncio.sleep(0.02)
        assert seen == {cancelled: 1.0}


async def test_a_stream_cut_at_shutdown_is_recorded_as_shutdown(fake: FakeVllm) -> None:
    from gateway.shutdown import Drain

    held = asyncio.Event()
    fake.behaviour.hold_after_first = held
    drain = Drain(grace_s=30)
    app = create_app(settings(fake), drain=drain)
    async with lifespan(app) as state:
        await ready(app, state)
        got_first = asyncio.Event()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and b"Hello" in message.get("body", b""):
                got_first.set()

        body = {"model": "chat", "stream": True, "messages": USER}
        call = asyncio.create_task(
            asgi_call(app, state, "POST", "/v1/chat/completions", body, send=send)
        )
        await got_first.wait()
        drain.begin()
        drain.end_grace()
        messages = await call
        text = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        assert b"shutting_down" in text
        assert text.endswith(b"data: [DONE]\n\n")
        line = 'gateway_requests_total{outcome="shutdown",priority_class="interactive",task="chat"}'
        assert await scraped(app, state, line) == 1
        held.set()


async def test_a_pausable_request_that_never_runs_leaves_nothing_behind(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """Found by the 20-minute fake soak: RSS grew 1.4 MiB/min. A pausable request registers
    how to pause it before it queues; one that expired in the queue, was refused at admission
    or whose client left while it waited kept that registration, and with it its lifecycle
    (exchange, buffers), for the life of the process."""
    from gateway.config import parse_config
    from gateway.lifecycle import Lifecycle

    config = parse_config(
        {
            "classes": {"batch": {"head_start_s": 10, "max_queued": 2, "max_preemptions": 4}},
            "tasks": {
                "long": {"class": "batch", "queue_deadline_s": 0.3, "deadline_s": 30},
                "hold": {"class": "realtime", "queue_deadline_s": 30},
            },
        }
    )
    held = asyncio.Event()
    fake.behaviour.hold_after_first = held
    long = {"model": "long", "messages": USER, "stream": True}
    async with (
        start_gateway(config, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
    ):
        holding = asyncio.create_task(
            c.post("/v1/chat/completions", json={"model": "hold", "messages": USER, "stream": True})
        )
        await until(lambda: fake.running == 1)  # the only slot is taken, and not pausable
        # Queued until their queue deadline (504), or refused by the full class queue (429).
        statuses = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=long) for _ in range(4))
        )
        assert sorted(r.status_code for r in statuses) == [429, 429, 504, 504]
        # A client that leaves while its request waits.
        leaving = asyncio.create_task(c.post("/v1/chat/completions", json=long))
        await until(lambda: len(fake.seen) == 1)
        await asyncio.sleep(0.05)
        leaving.cancel()
        held.set()
        assert (await holding).status_code == 200
        async with asyncio.timeout(5):
            while True:
                gc.collect()
                if not [o for o in gc.get_objects() if type(o) is Lifecycle]:
                    break
                await asyncio.sleep(0.05)

"""Several gateway processes sharing a real redis-server in front of one real vLLM (issue 13):
one tenant's rate holds across them, vLLM never gets more than its window from all of them
together, a SIGKILLed gateway's slots come back within the lease TTL, and a SIGKILLed Redis
costs no request a 5xx."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_key
from tests.integration.test_vllm_scheduling import GO
from tests.redis_server import RedisServer, redis_server
from tests.servers import gateway_process_handle, server_timing_ms
from tests.support import metric, sample_vllm
from tests.vllm_server import OUTPUT, VllmServer, free_port

TTL_S = 5.0  # gateway.shared.RedisLink's default lease TTL


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server(OUTPUT / "redis-scaleout" / "redis.log") as server:
        yield server


def args(vllm: VllmServer, redis: RedisServer, *extra: str) -> list[str]:
    return [
        "--upstreams", vllm.url, "--window", str(vllm.max_num_seqs), "--window-mode", "fixed",
        "--health-interval", "0.5", "--access-log", "off", "--log-level", "info",
        "--redis", redis.url, *extra,
    ]  # fmt: skip


async def start(
    stack: AsyncExitStack, argv: list[str], name: str
) -> tuple[httpx.AsyncClient, asyncio.subprocess.Process]:
    log = OUTPUT / "redis-scaleout" / f"{name}.log"
    url, process = await stack.enter_async_context(gateway_process_handle(argv, free_port(), log))
    client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=300))
    async with asyncio.timeout(10):  # the link connects in the background at start
        while await metric(client, "gateway_redis_up") != 1:
            await asyncio.sleep(0.05)
    return client, process


def batch(c: httpx.AsyncClient, max_tokens: int) -> asyncio.Task[httpx.Response]:
    body = {"model": "batch", "messages": GO, "max_tokens": max_tokens}
    return asyncio.create_task(c.post("/v1/chat/completions", json=body))


async def timed(c: httpx.AsyncClient, max_tokens: int) -> tuple[float, float, httpx.Response]:
    """A batch request and when it ran at the upstream, on this process' clock: from its
    dispatch (sent + the gateway's queue time, Server-Timing) to its answer."""
    sent = time.monotonic()
    body = {"model": "batch", "messages": GO, "max_tokens": max_tokens}
    r = await c.post("/v1/chat/completions", json=body)
    return sent + server_timing_ms(r.headers, "queue") / 1000, time.monotonic(), r


async def test_two_gateways_never_put_more_than_the_window_on_vllm(
    vllm: VllmServer, redis: RedisServer
) -> None:
    """Each gateway alone would fill vLLM's 4 slots with its own 6 batch requests (8 in all,
    4 waiting in vLLM); with the leases they never put more than the 4 on it together, and
    they run side by side."""
    async with AsyncExitStack() as stack:
        a, _ = await start(stack, args(vllm, redis), "window-a")
        b, _ = await start(stack, args(vllm, redis), "window-b")
        seen: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_vllm(vllm.url, seen, stop))
        work = [asyncio.create_task(timed(c, 200)) for c in (a, b) for _ in range(6)]
        redis_up: list[float] = []
        while not all(t.done() for t in work):
            redis_up += [await metric(c, "gateway_redis_up") for c in (a, b)]
            await asyncio.sleep(0.1)
        stop.set()
        await sampler
        runs = await asyncio.gather(*work)
    assert [r.status_code for _, _, r in runs] == [200] * 12, [r.text for _, _, r in runs]
    assert len(seen) >= 5, seen
    assert max(seen) == vllm.max_num_seqs, seen  # it saw the window full, and never over
    assert min(redis_up) == 1  # shared all along: no false outage on a loaded machine
    # Side by side: some request of A was dispatched while one of B still ran (or the other
    # way round), rather than after all of them had ended. Not "for long": the overlap
    # depends on how soon the syncs reach Redis, which on this host can take seconds. Two
    # designs failed this: leases granting "slots held" (a gateway over its share refilled
    # its own freed slots), and refilling a freed slot before the sync giving it back reached
    # Redis (while vLLM decodes on these two cores, other processes may not run for seconds:
    # that sync took up to 6.6 s, and one gateway ran its whole backlog first).
    overlaps = [
        min(end_a, end_b) - max(start_a, start_b)
        for start_a, end_a, _ in runs[:6]
        for start_b, end_b, _ in runs[6:]
    ]
    t0 = min(start for start, _, _ in runs)
    spans = [(round(start - t0, 2), round(end - t0, 2)) for start, end, _ in runs]
    assert max(overlaps) > 0, f"A ran {spans[:6]}, B ran {spans[6:]}"


async def test_a_killed_gateways_slots_come_back_within_the_lease_ttl(
    vllm: VllmServer, redis: RedisServer
) -> None:
    label = vllm.url.split("://", 1)[1]
    lease = f'gateway_window_lease{{upstream="{label}"}}'
    async with AsyncExitStack() as stack:
        a, a_process = await start(stack, args(vllm, redis), "kill-a")
        b, _ = await start(stack, args(vllm, redis), "kill-b")
        a_work = [batch(a, 2000) for _ in range(vllm.max_num_seqs)]
        async with asyncio.timeout(30):
            while await metric(a, lease) < vllm.max_num_seqs:
                await asyncio.sleep(0.05)
        a_process.send_signal(signal.SIGKILL)  # no goodbye: its leases stay in Redis
        killed = time.monotonic()
        await a_process.wait()
        # B wants the whole window; only the expiry of A's leases can give it to B.
        b_work = [batch(b, 40) for _ in range(vllm.max_num_seqs)]
        async with asyncio.timeout(TTL_S + 10):
            while await metric(b, lease) < vllm.max_num_seqs:
                await asyncio.sleep(0.05)
        taken_back_s = time.monotonic() - killed
        results = await asyncio.gather(*b_work)
        await asyncio.gather(*a_work, return_exceptions=True)  # their gateway is gone
    assert [r.status_code for r in results] == [200] * vllm.max_num_seqs
    # Within the TTL, plus a heartbeat and the machine's stalls; not instantly either, since
    # nothing but the expiry could have freed A's leases.
    assert 1.0 <= taken_back_s <= TTL_S + 3.0, taken_back_s


async def test_one_tenants_rate_holds_across_gateways(
    vllm: VllmServer, redis: RedisServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[tenants.acme]\nkeys = ["{hash_key("sk-acme")}"]\nrequests_per_s = 2\n',
        encoding="utf-8",
    )
    async with AsyncExitStack() as stack:
        a, _ = await start(stack, args(vllm, redis, "--keys", str(keys)), "rate-a")
        b, _ = await start(stack, args(vllm, redis, "--keys", str(keys)), "rate-b")
        body = {"model": "chat", "messages": GO, "max_tokens": 1}
        headers = {"Authorization": "Bearer sk-acme"}
        started = time.monotonic()
        answers = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=body, headers=headers) for c in (a, b) * 8)
        )
        sent_s = time.monotonic() - started
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, [r.text for r in answers]
    # One burst (2: a second's worth) plus what refilled while the requests arrived; each
    # gateway alone would have allowed 2 of its own 8 at once, 4 in all.
    assert 2 <= codes.count(200) <= 2 + int(2 * sent_s), (codes, sent_s)
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limited" for r in refused)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)


async def test_redis_killed_mid_run_costs_no_request_a_5xx(
    vllm: VllmServer, redis: RedisServer
) -> None:
    async with AsyncExitStack() as stack:
        a, _ = await start(stack, args(vllm, redis), "outage-a")
        b, _ = await start(stack, args(vllm, redis), "outage-b")
        body = {"model": "chat", "messages": GO, "max_tokens": 8}

        async def traffic(c: httpx.AsyncClient, until: asyncio.Event) -> list[int]:
            codes = []
            while not until.is_set():
                codes.append((await c.post("/v1/chat/completions", json=body)).status_code)
            return codes

        stop = asyncio.Event()
        flows = [asyncio.create_task(traffic(c, stop)) for c in (a, b, a, b)]
        await asyncio.sleep(1.0)  # traffic through Redis first (the flows own the pacing)
        redis.kill()
        async with asyncio.timeout(10):
            while await metric(a, "gateway_redis_up") + await metric(b, "gateway_redis_up") > 0:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # traffic on local state
        redis.start()
        async with asyncio.timeout(15):
            while await metric(a, "gateway_redis_up") + await metric(b, "gateway_redis_up") < 2:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # traffic through Redis again
        stop.set()
        codes = [code for flow in await asyncio.gather(*flows) for code in flow]
    assert len(codes) >= 8
    assert set(codes) == {200}, codes

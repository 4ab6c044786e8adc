"""Faults on real vLLM: a vLLM killed mid-stream, failover to another, recovery when it comes
back, and two gateways sharing one vLLM.

The victim is a vLLM of this module's own (the session's servers must stay up); killing it is
SIGKILL to its process group, as the kernel's OOM killer or a node loss would do it. The
restart runs while the test goes on, so the time it costs is spent checking that the other
upstream keeps serving. Timing claims live in the benchmarks; these tests assert order and
outcomes, with margins.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.settings import Settings
from tests.integration.conftest import GatewayFactory
from tests.integration.test_vllm_scheduling import GO, metric, table, vllm_running
from tests.servers import gateway_process, running_gateway, server_timing_ms
from tests.support import metric_value
from tests.vllm_server import OUTPUT, SHARED_CPU, VllmServer, free_port, model_dir

LONG_STREAM = {"model": "chat", "messages": GO, "max_tokens": 1000, "stream": True}
SHORT = {"model": "chat", "messages": GO, "max_tokens": 8}


class Victim(VllmServer):
    """A vLLM that can be killed outright and started again on the same port."""

    def kill(self) -> None:
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGKILL)  # the API server and its engine
        self._process.wait(timeout=10)


@pytest.fixture(scope="module")
def victim(request: pytest.FixtureRequest) -> Iterator[Victim]:
    model = model_dir("QWEN_GATEWAY_TINY_MODEL", "tiny-qwen2")
    server = Victim(model, 4, "tiny-victim", "--enforce-eager", env=SHARED_CPU).start()
    try:
        request.getfixturevalue("servers")  # the session's servers start meanwhile
        server.wait_ready()
        yield server
    finally:
        server.stop()


def upstream_label(server: VllmServer) -> str:
    return server.url.split("://", 1)[1]


async def breaker(c: httpx.AsyncClient, server: VllmServer) -> float:
    return await metric(c, f'gateway_upstream_breaker_state{{upstream="{upstream_label(server)}"}}')


async def until_status(c: httpx.AsyncClient, path: str, status: int, timeout_s: float) -> float:
    """Poll until ``path`` answers ``status``; the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while (await c.get(path)).status_code != status:
            await asyncio.sleep(0.1)
    return time.monotonic() - started


class Stream:
    """A long stream read in the background: its lines, when its first token came, when it
    ended."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.lines: list[str] = []
        self.started = asyncio.Event()
        self.ended_at = 0.0
        self.task = asyncio.create_task(self._read(client))

    async def _read(self, client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    self.lines.append(line)
                if '"content":"' in line and '"content":""' not in line:
                    self.started.set()
        self.ended_at = time.monotonic()


async def test_killed_upstream_mid_stream_failover_and_recovery(
    vllm: VllmServer, victim: Victim, start_gateway: GatewayFactory
) -> None:
    pair_settings = Settings(
        upstreams=(victim.url, vllm.url),  # the victim first: it wins ties, so it gets work
        window=4,
        window_mode="fixed",
        routing="least-loaded",  # ties by load (task affinity would pick by the task's hash)
        health_interval_s=0.5,
        access_log=False,
    )
    async with (
        start_gateway(victim) as solo_url,
        running_gateway(pair_settings) as pair_url,
        httpx.AsyncClient(base_url=solo_url, timeout=120) as solo,
        httpx.AsyncClient(base_url=pair_url, timeout=120) as pair,
    ):
        # Two long streams on the victim, one through each gateway.
        streams = [Stream(pair), Stream(solo)]
        async with asyncio.timeout(60):
            for stream in streams:
                await stream.started.wait()
        async with asyncio.timeout(10):
            while await vllm_running(victim) != 2:
                await asyncio.sleep(0.1)

        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await asyncio.gather(*(s.task for s in streams))
        for stream in streams:
            assert stream.ended_at - killed_at < 2, stream.ended_at - killed_at
            assert stream.lines[-1] == "data: [DONE]"
            error = json.loads(stream.lines[-2][6:])["error"]
            assert error["type"] == "upstream_error", error

        # A gateway whose only upstream just died answers 503 at once.
        r = await solo.post("/v1/chat/completions", json=SHORT)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] in ("upstream_unavailable", "no_upstream")

        victim.start()  # back on the same port in a while; meanwhile, the other one serves
        responses = await asyncio.gather(
            *(
                pair.post("/v1/chat/completions", json={**SHORT, "stream": i % 2 == 0})
                for i in range(6)
            )
        )
        assert [r.status_code for r in responses] == [200] * 6
        assert all("error" not in r.text for r in responses)
        await until_status(solo, "/ready", 503, timeout_s=10)
        r = await pair.get("/ready")
        assert r.status_code == 200, r.text
        ready = r.json()
        # Nothing listens on the victim's port: it is polled as starting again (no work, no
        # growing cool-down), so it is back as soon as it answers.
        assert ready["upstreams"][upstream_label(victim)]["up"] is False
        assert ready["upstreams"][upstream_label(vllm)]["up"] is True

        served: list[int] = []
        started = asyncio.create_task(asyncio.to_thread(victim.wait_ready))
        while not started.done():  # keep serving through the pair while the victim starts
            served.append((await pair.post("/v1/chat/completions", json=SHORT)).status_code)
            await asyncio.sleep(0.5)
        await started
        assert served
        assert set(served) == {200}

        # Back: the next health check finds it.
        await until_status(solo, "/ready", 200, timeout_s=90)
        r = await solo.post("/v1/chat/completions", json=SHORT)
        assert r.status_code == 200, r.text
        async with asyncio.timeout(90):
            while not (await pair.get("/ready")).json()["upstreams"][upstream_label(victim)]["up"]:
                await asyncio.sleep(0.2)
        assert await breaker(pair, victim) == 0


async def test_two_gateways_sharing_one_vllm_see_each_others_load(
    vllm: VllmServer, start_gateway: GatewayFactory
) -> None:
    """Gateway A (in the test's process) runs two long batch generations on a 4-wide vLLM.
    Gateway B (``python -m gateway``, its own process) counts them as the upstream's
    external load (scraped from vLLM's metrics), so of its own three batch requests it sends
    only the two that fit beside A's, and its realtime requests still start at once: B takes
    a slot back from its own batch (preemption; it cannot pause A's work).

    Without the external load B would send all three (its own window looks empty; batch may
    use every free slot), vLLM would queue one, and B's realtime requests would wait in
    vLLM's queue.
    A's work is one long round: between rounds, a slot A frees and refills is a gap in vLLM's
    gauge whose length depends on the machine's load (the hold in :mod:`gateway.scrape`,
    tested with a fake, keeps B out of it; that is not deterministic on real vLLM).
    """
    b_args = ["--upstreams", vllm.url, "--window", str(vllm.max_num_seqs), "--window-mode", "fixed"]
    # B's access log (in its log file) says when each of its requests came, waited and ran.
    b_args += ["--health-interval", "0.5", "--access-log", "on", "--log-level", "warning"]
    async with (
        start_gateway(vllm, table(tasks={"batch": {"max_tokens_limit": 4000}})) as a_url,
        gateway_process(b_args, free_port(), OUTPUT / "gateway-faults-b.log") as b_url,
        httpx.AsyncClient(base_url=a_url, timeout=300) as a,
        httpx.AsyncClient(base_url=b_url, timeout=300) as b,
    ):

        def batch(c: httpx.AsyncClient, max_tokens: int) -> asyncio.Task[httpx.Response]:
            body = {"model": "batch", "messages": GO, "max_tokens": max_tokens}
            return asyncio.create_task(c.post("/v1/chat/completions", json=body))

        def sentiment(i: int) -> dict[str, object]:
            return {"model": "sentiment", "messages": [{"role": "user", "content": f"t{i}"}]}

        # Compile the label grammar first: on a quiet machine that can take longer than the
        # tiny model needs for a long generation.
        assert (await b.post("/v1/chat/completions", json=sentiment(-1))).status_code == 200
        # 4000 tokens (A's table allows them), twice B's: two fresh-clone runs saw A's work
        # end, or B's requests reach B only after it ended, on a host stalled for seconds.
        a_work = [batch(a, 4000) for _ in range(2)]
        label = upstream_label(vllm)
        # Generous: on a fresh machine vLLM's first long generations start slowly (a fresh-
        # clone CI run timed out here at 30 s once; the test passed locally in 85 s in all).
        b_saw: list[float] = []  # B's readings of the upstream's running count, in order
        async with asyncio.timeout(90):
            while True:
                b_saw.append(await metric(b, f'gateway_upstream_running{{upstream="{label}"}}'))
                if b_saw[-1] >= 2:
                    break
                # A fresh-clone run timed out here at 90 s with nothing to say why: say it,
                # with when A's requests ran (queue and upstream times) and what B read.
                ended = [t.result() for t in a_work if t.done()]
                assert not ended, (
                    "A's work ended before B saw it: "
                    f"{[(r.status_code, r.headers.get('server-timing')) for r in ended]}, "
                    f"B read {len(b_saw)} times, the last {b_saw[-20:]}"
                )
                await asyncio.sleep(0.05)  # B's scrape sees A's work
        b_work = [batch(b, 2000) for _ in range(3)]
        # B sends two and holds the third: A's work takes two. 30 s, not 10: a fresh-clone run
        # timed out at 10 s while these two tiny-model servers stall other processes for
        # seconds (see test_redis_scaleout); had B sent all three, the depth stays 0 anyway.
        held: list[tuple[float, float, float, float]] = []  # (s, queued, in flight, running)
        start = time.monotonic()
        try:
            async with asyncio.timeout(30):
                while True:
                    text = (await b.get("/metrics")).text
                    held.append(
                        (
                            round(time.monotonic() - start, 2),
                            metric_value(text, 'gateway_queue_depth{priority_class="batch"}'),
                            metric_value(text, f'gateway_inflight_requests{{upstream="{label}"}}'),
                            metric_value(text, f'gateway_upstream_running{{upstream="{label}"}}'),
                        )
                    )
                    if held[-1][1] >= 1:
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:  # a fresh-clone run failed here with nothing to say why: say it
            changes = [h for i, h in enumerate(held) if i == 0 or h[1:] != held[i - 1][1:]]
            a_ended = [t.done() for t in a_work]
            pytest.fail(
                f"B never held one back; (s, queued, in flight, running): {changes}; "
                f"A's work done: {a_ended}; B's: {[t.done() for t in b_work]}"
            )
        assert await metric(b, f'gateway_inflight_requests{{upstream="{label}"}}') == 2

        for i in range(3):
            r = await b.post("/v1/chat/completions", json=sentiment(i))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] in ("positive", "negative")
            # It did not wait for a batch generation to end (2000 tokens; its queue deadline is
            # 2 s): B took a slot back. Not a bound in milliseconds: it took 1.1 s once in a
            # fresh-clone run, in which this setup stalls processes for seconds.
            assert server_timing_ms(r.headers, "queue") < 2000
            assert not any(t.done() for t in b_work)
        assert await metric(b, 'gateway_preemptions_total{priority_class="batch"}') >= 1

        results = await asyncio.gather(*a_work, *b_work)
        assert [r.status_code for r in results] == [200] * 5
        assert [r.json()["usage"]["completion_tokens"] for r in results[:2]] == [4000, 4000]

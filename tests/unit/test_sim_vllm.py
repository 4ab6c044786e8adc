"""The simulated vLLM the GPU-scale benchmark rests on (loadtest/sim_engine.py, sim_vllm.py).

The batching model is driven step by step (no clock, no sleeps); one test runs the server
on a real socket and reads a stream the way the gateway does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from loadtest.sim_engine import (
    TOKEN,
    Costs,
    Engine,
    Policy,
    Seq,
    answer_length,
    continued_tokens,
    replay,
)
from loadtest.sim_vllm import serve

COSTS = Costs(
    base_s=0.010,
    per_seq_s=0.001,
    per_prefill_token_s=0.0001,
    per_context_token_s=0.0,
    max_num_seqs=4,
    max_batched_tokens=1000,
    kv_tokens=10_000,
)


def seq(i: int, priority: int = 0, prompt: int = 10, target: int = 5) -> Seq:
    return Seq(id=i, priority=priority, arrival=0.0, prompt_tokens=prompt, target=target)


def run_until_idle(engine: Engine, limit: int = 10_000) -> list[tuple[int, int]]:
    """(step number, request id) of every finished request."""
    finished: list[tuple[int, int]] = []
    for n in range(limit):
        if engine.idle():
            return finished
        for e in engine.step().emitted:
            if e.finished:
                finished.append((n, e.seq.id))
    raise AssertionError("the engine never went idle")


def test_a_step_costs_more_with_more_running_sequences() -> None:
    durations = {}
    for n in (1, 4):
        engine = Engine(COSTS)
        for i in range(n):
            engine.add(seq(i, prompt=10, target=50))
        prefill = engine.step()  # every prompt is read in the first step
        assert prefill.prefill_tokens == 10 * n
        decode = engine.step()
        assert decode.batch == n
        assert decode.decode_tokens == n
        durations[n] = decode.duration
    assert durations[1] == COSTS.base_s + COSTS.per_seq_s
    assert durations[4] == COSTS.base_s + 4 * COSTS.per_seq_s
    assert durations[4] > durations[1]


def test_prefill_is_charged_per_prompt_token_and_chunked_by_the_token_budget() -> None:
    engine = Engine(_with(COSTS, max_batched_tokens=256))
    engine.add(seq(1, prompt=600, target=3))
    first = engine.step()
    assert first.prefill_tokens == 256
    assert not first.emitted
    assert first.duration == COSTS.base_s + COSTS.per_seq_s + 256 * COSTS.per_prefill_token_s
    assert engine.step().prefill_tokens == 256
    last = engine.step()
    assert last.prefill_tokens == 88
    assert [e.generated for e in last.emitted] == [1]


def test_max_num_seqs_caps_the_batch() -> None:
    engine = Engine(COSTS)
    for i in range(10):
        engine.add(seq(i, target=100))
    engine.step()
    assert engine.num_running == 4
    assert engine.num_waiting == 6


def test_the_kv_cache_limits_running_sequences() -> None:
    # 16-token blocks: each request needs ceil((prompt + 1) / 16) = 4 blocks to start; a
    # cache of 10 blocks admits two of them, however many max_num_seqs allows.
    engine = Engine(_with(COSTS, kv_tokens=160, max_num_seqs=8))
    for i in range(5):
        engine.add(seq(i, prompt=50, target=3))
    engine.step()
    assert engine.num_running == 2
    assert engine.num_waiting == 3
    assert engine.kv_usage == 0.8
    run_until_idle(engine)
    assert engine.kv_usage == 0.0


def test_kv_exhaustion_preempts_the_least_important_running_request() -> None:
    engine = Engine(_with(COSTS, kv_tokens=64, max_num_seqs=8))  # 4 blocks
    engine.add(seq(1, priority=0, prompt=15, target=40))
    engine.add(seq(2, priority=5, prompt=15, target=40))
    finished = run_until_idle(engine)
    assert engine.counters.preemptions >= 1
    assert next(i for _, i in finished) == 1  # the important one finished first
    assert {i for _, i in finished} == {1, 2}  # the evicted one recomputed and finished


def test_priority_policy_admits_the_lowest_value_first_and_fcfs_by_arrival() -> None:
    order = {}
    policies: tuple[Policy, ...] = ("priority", "fcfs")
    for policy in policies:
        engine = Engine(_with(COSTS, max_num_seqs=1), policy)
        engine.add(seq(99, priority=0, target=2))  # occupies the only slot
        engine.step()
        for i, p in zip(range(6), (5, -5, 0, 10, -10, 3), strict=True):
            engine.add(seq(i, priority=p, target=2))
        order[policy] = [s.priority for s in engine.waiting()]
        finished = run_until_idle(engine)
        assert next(i for _, i in finished) == 99  # no preemption for priority
    assert order["priority"] == [-10, -5, 0, 3, 5, 10]  # as vLLM 0.32 served them here
    assert order["fcfs"] == [5, -5, 0, 10, -10, 3]


def test_a_more_important_arrival_never_preempts_a_running_request() -> None:
    engine = Engine(_with(COSTS, max_num_seqs=1))
    engine.add(seq(1, priority=10, target=20))
    engine.step()
    engine.add(seq(2, priority=-100, target=2))
    for _ in range(18):  # its 2nd to 19th token: the important one waits throughout
        engine.step()
        assert [s.id for s in engine.running] == [1]
    assert run_until_idle(engine)[-1][1] == 2


def test_an_abort_frees_the_slot_and_the_cache_at_the_next_step() -> None:
    engine = Engine(_with(COSTS, max_num_seqs=1))
    running = engine.add(seq(1, prompt=40, target=1000))
    engine.add(seq(2, target=2))
    engine.step()
    assert engine.kv_usage > 0
    assert engine.num_waiting == 1
    engine.abort(running)
    result = engine.step()
    assert [s.id for s in engine.running] == [2]
    assert engine.num_waiting == 0
    assert all(e.seq.id == 2 for e in result.emitted)
    waiting = engine.add(seq(3, target=2))
    engine.abort(waiting)  # an aborted waiting request is never admitted
    assert engine.num_waiting == 0
    assert [i for _, i in run_until_idle(engine)] == [2]
    assert engine.kv_usage == 0.0


def test_replay_in_virtual_time_gives_first_token_after_the_prefill_step() -> None:
    engine = Engine(COSTS)
    tracked = replay(engine, [(0.0, seq(1, prompt=100, target=3)), (5.0, seq(2, target=1))])
    one = tracked[1]
    assert one.first == COSTS.base_s + COSTS.per_seq_s + 100 * COSTS.per_prefill_token_s
    assert one.tokens == 3
    assert one.end is not None
    assert one.end > one.first
    assert tracked[2].first is not None
    assert tracked[2].first > 5.0


def test_answer_lengths_are_deterministic_and_continuations_count_what_they_have() -> None:
    chat: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
            {"role": "user", "content": "hello"},
        ],
        "seed": 7,
    }
    whole = answer_length(chat, 64)
    assert whole == answer_length(chat, 64)
    assert 1 <= whole <= 64
    partial = {
        **chat,
        "messages": [*chat["messages"], {"role": "assistant", "content": TOKEN * 3}],
        "continue_final_message": True,
    }
    assert continued_tokens(partial) == 3
    assert answer_length(partial, 61) == max(whole - 3, 1)
    label = {"messages": chat["messages"], "structured_outputs": {"choice": ["a", "b"]}}
    assert answer_length(label, 10) == 2


async def test_a_streamed_chat_completion_is_well_formed_sse_with_usage() -> None:
    port = 19790
    [server] = await serve("127.0.0.1", [port], COSTS, "priority", "sim-test")
    body = {
        "model": "sim-test",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "priority": -3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"]][1:]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == TOKEN * 5
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == []
    assert b'"choices":[]' in events[-3]
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        metrics = await response.text()
    assert 'vllm:num_requests_running{model_name="sim-test"} 0' in metrics
    assert "vllm:inter_token_latency_seconds_count" in metrics
    await server.aclose()


async def test_closing_the_connection_aborts_the_request() -> None:
    port = 19791
    [server] = await serve("127.0.0.1", [port], _with(COSTS, base_s=0.05), "priority", "m")
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
        await response.content.readuntil(b"\n\n")  # the first token came
        assert server.engine.num_running == 1
        response.close()
    for _ in range(100):
        if server.engine.idle():
            break
        await asyncio.sleep(0.02)
    assert server.engine.idle()
    assert server.engine.counters.aborted == 1
    await server.aclose()


def _fields(costs: Costs) -> dict[str, object]:
    return {name: getattr(costs, name) for name in costs.__dataclass_fields__}


def _with(costs: Costs, **changes: object) -> Costs:
    return Costs(**{**_fields(costs), **changes})  # type: ignore[arg-type]

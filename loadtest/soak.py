"""Soak benchmark: does the gateway leak memory or file descriptors under a long mixed load?

    ./launch/bench.sh soak                # 10 minutes
    ./launch/bench.sh soak --minutes 3    # a shorter check

It starts the tiny-model stack: vLLM on the tiny random Qwen2 model (``launch/vllm.sh ...
--enforce-eager``, in its own process group; the model folder is ``--model``, else
``$QWEN_GATEWAY_TINY_MODEL``, else ``~/.cache/qwen-gateway/models/tiny-qwen2``) and the
gateway as ``python -m gateway`` (window = vLLM's ``--max-num-seqs``). After a warm-up it
runs a closed-loop mix with bounded concurrency for the duration:

    sentiment   JSON, a constrained label              chat      streamed
    batch       JSON, longer answers                   deadline  X-Request-Deadline-Ms far
    disconnect  stream abandoned after a few events              too short: 504s and in-band
    give_up     JSON abandoned by a client timeout                errors
    bad         invalid JSON or an unknown task (4xx)

Every ``--interval`` seconds it samples the gateway process: RSS (``/proc/PID/status``
VmRSS), open file descriptors (``/proc/PID/fd``) and threads; one last sample is taken after
the load stops and the gateway has idled (its pooled upstream connections may still be open).
It prints a table and writes ``loadtest/results/soak.json``: start/end/max and the linear
slope per minute of RSS and FDs (over the whole load and over its second half, after
warm-up effects), and request counts by outcome. Logs go to ``loadtest/out/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtest.*` importable
    sys.path.insert(0, str(ROOT))

from loadtest.stack import (  # noqa: E402
    describe_machine,
    gateway_server,
    port_is_free,
    source_state,
    vllm_server,
)

WINDOW = 4  # vLLM --max-num-seqs and the gateway's --window
PORTS = range(19400, 19500)
MIX = {
    "sentiment": 30,
    "chat": 25,
    "batch": 10,
    "deadline": 10,
    "disconnect": 10,
    "give_up": 8,
    "bad": 7,
}
TEXTS = (
    "I absolutely love this phone, the battery lasts for days.",
    "The delivery was late and the box was crushed.",
    "这家餐厅太难吃了，再也不来了。",
    "客服态度非常好，问题很快就解决了。",
    "Write a short note about queues and deadlines in web services.",
)


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # seconds since the load started
    phase: str  # "load" or "idle"
    rss_kib: int
    fds: int
    threads: int
    requests: int  # finished so far


def sample(pid: int, t_s: float, phase: str, requests: int) -> Sample:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return Sample(
        t_s=round(t_s, 1),
        phase=phase,
        rss_kib=int(fields["VmRSS"][0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"][0]),
        requests=requests,
    )


# -- the load -----------------------------------------------------------------------------


def chat_body(
    task: str, text: str, *, stream: bool = False, max_tokens: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": task, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def read_stream(response: aiohttp.ClientResponse, stop_after: int | None = None) -> str:
    """``ok`` if the stream ends with [DONE], ``inband:<code>`` for an error event."""
    outcome = "lost"
    events = 0
    async for line in response.content:
        text = line.decode(errors="replace").strip()
        if not text.startswith("data: "):
            continue
        events += 1
        data = text.removeprefix("data: ")
        if data == "[DONE]":
            return outcome if outcome.startswith("inband") else "ok"
        if data.startswith('{"error"'):
            outcome = "inband:" + str(json.loads(data)["error"].get("code"))
        if stop_after is not None and events >= stop_after:
            response.close()  # drop the connection, as a client that went away does
            return "abandoned"
    return outcome


async def one_request(
    session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random
) -> str:
    """Send one request of ``kind``; return its outcome (status, or how the client ended it)."""
    text = rng.choice(TEXTS)
    post = url + "/v1/chat/completions"
    headers: dict[str, str] = {}
    timeout: float | None = None
    stop_after: int | None = None
    if kind == "sentiment":
        body = chat_body("sentiment", text)
    elif kind == "chat":
        body = chat_body("chat", text, stream=True, max_tokens=rng.randint(8, 48))
    elif kind == "batch":
        body = chat_body("batch", text, max_tokens=rng.randint(32, 96))
    elif kind == "deadline":
        body = chat_body("chat", text, stream=rng.random() < 0.5, max_tokens=256)
        headers["X-Request-Deadline-Ms"] = str(rng.randint(50, 1500))
    elif kind == "disconnect":
        body = chat_body("chat", text, stream=True, max_tokens=128)
        stop_after = rng.randint(1, 4)
    elif kind == "give_up":
        body = chat_body("batch", text, max_tokens=256)
        timeout = rng.uniform(0.05, 1.0)
    else:
        bad = rng.choice(
            [b"{", b"[]", b'{"model": "no-such-task", "messages": []}', b'{"model": "chat"}']
        )
        async with session.post(post, data=bad, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return str(r.status)
    try:
        async with asyncio.timeout(timeout):
            async with session.post(post, json=body, headers=headers) as r:
                if r.status != 200:
                    await r.read()
                    return str(r.status)
                if r.content_type == "text/event-stream":
                    return await read_stream(r, stop_after)
                await r.read()
                return "ok"
    except TimeoutError:
        if timeout is not None:
            return "gave_up"
        raise


async def worker(
    session: aiohttp.ClientSession, url: str, rng: random.Random, until: float, counts: Counter[str]
) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            outcome = await one_request(session, url, kind, rng)
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"exception:{type(exc).__name__}"
        counts[f"{kind} {outcome}"] += 1


async def run_load(
    url: str, pid: int, minutes: float, concurrency: int, interval_s: float, seed: int
) -> tuple[list[Sample], Counter[str], float]:
    counts: Counter[str] = Counter()
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = Counter[str]()
        await asyncio.gather(
            *(
                worker(session, url, random.Random(seed - i), time.monotonic() + 15, warm)
                for i in range(concurrency)
            )
        )
        print(f"warm-up: {sum(warm.values())} requests", flush=True)
        started = time.monotonic()
        until = started + minutes * 60
        workers = [
            asyncio.create_task(worker(session, url, random.Random(seed + i), until, counts))
            for i in range(concurrency)
        ]
        print(f"{'t (s)':>7} {'RSS MiB':>8} {'FDs':>5} {'threads':>7} {'requests':>9}", flush=True)
        while True:
            now = time.monotonic()
            s = sample(pid, now - started, "load", sum(counts.values()))
            samples.append(s)
            print(
                f"{s.t_s:7.0f} {s.rss_kib / 1024:8.1f} {s.fds:5d} {s.threads:7d} {s.requests:9d}",
                flush=True,
            )
            if now >= until:
                break
            await asyncio.sleep(min(interval_s, until - now))
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
    await asyncio.sleep(5)  # idle: in-flight work done, client connections closed
    s = sample(pid, time.monotonic() - started, "idle", sum(counts.values()))
    samples.append(s)
    print(
        f"{s.t_s:7.0f} {s.rss_kib / 1024:8.1f} {s.fds:5d} {s.threads:7d} {s.requests:9d}  (idle)",
        flush=True,
    )
    return samples, counts, elapsed


# -- the report ---------------------------------------------------------------------------


def trend(samples: list[Sample], field: str) -> dict[str, float | None]:
    load = [s for s in samples if s.phase == "load"]
    values = [getattr(s, field) for s in load]

    def slope(part: list[Sample]) -> float | None:
        if len(part) < 3 or len({s.t_s for s in part}) < 2:
            return None
        fit = statistics.linear_regression(
            [s.t_s / 60 for s in part], [getattr(s, field) for s in part]
        )
        return round(fit.slope, 2)

    idle = [getattr(s, field) for s in samples if s.phase == "idle"]
    return {
        "start": values[0],
        "end": values[-1],
        "max": max(values),
        "idle": idle[-1] if idle else None,
        "slope_per_min": slope(load),
        "slope_per_min_second_half": slope(load[len(load) // 2 :]),
    }


def free_port(taken: set[int]) -> int:
    for port in PORTS:
        if port not in taken and port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def tiny_model(arg: str | None) -> str:
    default = Path.home() / ".cache" / "qwen-gateway" / "models" / "tiny-qwen2"
    path = Path(arg or os.environ.get("QWEN_GATEWAY_TINY_MODEL") or default)
    if not (path / "config.json").exists():
        raise SystemExit(f"no model at {path}: pass --model or set QWEN_GATEWAY_TINY_MODEL")
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8, help="clients with a request open at once")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--model", help="tiny model folder")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "soak.json")
    a = p.parse_args()
    model = tiny_model(a.model)
    logs = ROOT / "loadtest" / "out"
    vllm_port = free_port(set())
    gateway_port = free_port({vllm_port})
    vllm = vllm_server(
        model,
        vllm_port,
        WINDOW,
        logs / "soak-vllm.log",
        {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "--enforce-eager",
    )
    gateway = gateway_server(gateway_port, vllm.url, WINDOW, logs / "soak-gateway.log")
    with contextlib.ExitStack() as stack:
        stack.callback(vllm.stop)
        print(f"starting vLLM on {vllm.url} ({model})", flush=True)
        vllm.start().wait_ready("/health", 600)
        stack.callback(gateway.stop)
        gateway.start().wait_ready("/ready", 60)
        print(
            f"gateway {gateway.url} (pid {gateway.pid}); {a.minutes} min at concurrency {a.concurrency}",
            flush=True,
        )
        samples, counts, elapsed = asyncio.run(
            run_load(gateway.url, gateway.pid, a.minutes, a.concurrency, a.interval, a.seed)
        )
    total = sum(counts.values())
    by_status: Counter[str] = Counter()
    for key, n in counts.items():
        by_status[key.split(" ", 1)[1]] += n
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "minutes": a.minutes,
            "concurrency": a.concurrency,
            "interval_s": a.interval,
            "window": WINDOW,
            "mix": MIX,
            "model": model,
            "seed": a.seed,
        },
        "machine": asdict(describe_machine()),
        "source": source_state(),
        "rss_kib": trend(samples, "rss_kib"),
        "fds": trend(samples, "fds"),
        "threads": trend(samples, "threads"),
        "requests": {
            "total": total,
            "per_s": round(total / elapsed, 1),
            "by_outcome": dict(sorted(by_status.items())),
            "by_kind_and_outcome": dict(sorted(counts.items())),
        },
        "samples": [asdict(s) for s in samples],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print_summary(result)
    print(f"wrote {a.out}")
    return 0


def _cell(value: float | None, scale: float, width: int = 9) -> str:
    return f"{value / scale:{width}.1f}" if value is not None else f"{'-':>{width}}"


def print_summary(result: dict[str, Any]) -> None:
    print()
    print(
        f"{'':10} {'start':>9} {'end':>9} {'max':>9} {'idle':>9} {'slope/min':>10} {'2nd half':>10}"
    )
    for name, key, scale in (
        ("RSS MiB", "rss_kib", 1024),
        ("FDs", "fds", 1),
        ("threads", "threads", 1),
    ):
        t = result[key]
        print(
            f"{name:10} {_cell(t['start'], scale)} {_cell(t['end'], scale)} {_cell(t['max'], scale)} "
            f"{_cell(t['idle'], scale)} {_cell(t['slope_per_min'], scale, 10)} "
            f"{_cell(t['slope_per_min_second_half'], scale, 10)}"
        )
    r = result["requests"]
    print(f"\n{r['total']} requests, {r['per_s']}/s")
    for outcome, n in r["by_outcome"].items():
        print(f"  {outcome:28} {n:7d}")


if __name__ == "__main__":
    sys.exit(main())

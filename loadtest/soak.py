"""Soak benchmark: does the gateway leak memory or file descriptors under a long mixed load?

    ./launch/bench.sh soak                         # vLLM and the tiny model, 60 minutes
    ./launch/bench.sh soak --minutes 30            # shorter (it may not be able to judge)
    ./launch/bench.sh soak --upstream fake         # the paced fake upstream, 20 minutes

``--upstream vllm`` (the default) starts the tiny-model stack: vLLM on the tiny random Qwen2
model (``launch/vllm.sh ... --enforce-eager``, in its own process group; the model folder is
``--model``, else ``$QWEN_GATEWAY_TINY_MODEL``, else ``~/.cache/qwen-gateway/models/tiny-qwen2``)
and the gateway as ``python -m gateway`` (window = vLLM's ``--max-num-seqs``, 4), driven by 8
clients at about 8 requests/s. ``--upstream fake`` puts ``loadtest/fake_upstream.py`` in
vLLM's place, paced like a generation (~40 ms; FAKE_PACE), window 16 and 32 clients: some 30
to 50 times the request rate, so whatever a request leaves behind shows within minutes, and
every bounded structure is full early. It tests the gateway's own memory, not vLLM's
behaviour; the output says which upstream was used. The gateway runs with API keys (one
tenant rate-limited, for 429s). After a warm-up, a closed loop runs the mix for the duration:

    sentiment   JSON, a constrained label              chat      streamed
    batch       JSON, longer answers                   deadline  X-Request-Deadline-Ms far
    disconnect  stream abandoned after a few events              too short: 504s and in-band
    give_up     JSON abandoned by a client timeout                errors
    bad         invalid JSON or an unknown task (4xx)  limited   a rate-limited key: 429s

Every ``--interval`` seconds it samples the gateway process: RSS (``/proc/PID/status``
VmRSS), open file descriptors (``/proc/PID/fd``), threads, and from ``/status.json`` how full
the status page's rings are; one last sample is taken after the load stops and the gateway has
idled (its pooled upstream connections may still be open). It prints a table, the verdict
(:mod:`loadtest.soak_verdict`: the second half's RSS slope against 0.05 MiB/min, once every
bounded structure is full; exit status 0 PASS, 1 FAIL, 2 INCONCLUSIVE) and writes
``loadtest/results/soak.json`` (``soak-fake.json`` for the fake): start/end/max and the slope
per minute of RSS and FDs, the verdict, and request counts by outcome. Logs go to
``loadtest/out/``.
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

from gateway.auth import hash_key  # noqa: E402
from gateway.config import load_config  # noqa: E402
from loadtest.soak_verdict import Point, Verdict, judge  # noqa: E402
from loadtest.stack import (  # noqa: E402
    Server,
    describe_machine,
    fake_upstream,
    gateway_server,
    port_is_free,
    source_state,
    vllm_server,
)

WINDOW = 4  # vLLM --max-num-seqs and the gateway's --window
#: The paced fake: 16 chunks, the first after 10 ms, then one every 2 ms (~40 ms a generation).
FAKE_PACE = {"chunks": 16, "first_ms": 10.0, "chunk_ms": 2.0}
FAKE_WINDOW = 16
PORTS = range(19400, 19500)
MIX = {
    "sentiment": 30,
    "chat": 25,
    "batch": 10,
    "deadline": 10,
    "disconnect": 10,
    "give_up": 8,
    "bad": 7,
    "limited": 5,
}
#: Every request carries a key (the gateway runs with keys); ``limited`` uses one held to
#: LIMITED_RATE requests a second, so most of its requests are refused with 429.
KEY, LIMITED_KEY, LIMITED_RATE = "sk-soak", "sk-soak-limited", 1


@dataclass(frozen=True, slots=True)
class Profile:
    """The mix's timings, in proportion to how fast the upstream answers."""

    deadline_ms: tuple[int, int]  # X-Request-Deadline-Ms of the ``deadline`` kind
    give_up_s: tuple[float, float]  # the ``give_up`` client's timeout


#: The tiny model on vLLM answers in about a second; the paced fake in ~40 ms (FAKE_PACE).
VLLM_PROFILE = Profile(deadline_ms=(50, 1500), give_up_s=(0.05, 1.0))
FAKE_PROFILE = Profile(deadline_ms=(5, 100), give_up_s=(0.005, 0.1))
#: The tasks the mix sends to: the verdict waits for their longest queue deadline.
MIX_TASKS = ("sentiment", "chat", "batch")
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
    rings: dict[str, int]  # the status page's rings: requests kept per task ({}: unknown)


def sample(pid: int, t_s: float, phase: str, requests: int, rings: dict[str, int]) -> Sample:
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
        rings=rings,
    )


async def ring_fill(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, int]]:
    """The rings' bound and how many requests each task's ring keeps, from /status.json."""
    try:
        async with session.get(url + "/status.json", timeout=aiohttp.ClientTimeout(10)) as r:
            bounds = (await r.json())["bounds"]["recent"]
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
        return 0, {}
    return int(bounds["per_task"]), {task: int(n) for task, n in bounds["kept"].items()}


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
    session: aiohttp.ClientSession,
    url: str,
    kind: str,
    rng: random.Random,
    profile: Profile = VLLM_PROFILE,
) -> str:
    """Send one request of ``kind``; return its outcome (status, or how the client ended it)."""
    text = rng.choice(TEXTS)
    post = url + "/v1/chat/completions"
    headers: dict[str, str] = {"Authorization": f"Bearer {KEY}"}
    timeout: float | None = None
    stop_after: int | None = None
    if kind == "sentiment":
        body = chat_body("sentiment", text)
    elif kind == "limited":
        body = chat_body("sentiment", text)
        headers["Authorization"] = f"Bearer {LIMITED_KEY}"
    elif kind == "chat":
        body = chat_body("chat", text, stream=True, max_tokens=rng.randint(8, 48))
    elif kind == "batch":
        body = chat_body("batch", text, max_tokens=rng.randint(32, 96))
    elif kind == "deadline":
        body = chat_body("chat", text, stream=rng.random() < 0.5, max_tokens=256)
        headers["X-Request-Deadline-Ms"] = str(rng.randint(*profile.deadline_ms))
    elif kind == "disconnect":
        body = chat_body("chat", text, stream=True, max_tokens=128)
        stop_after = rng.randint(1, 4)
    elif kind == "give_up":
        body = chat_body("batch", text, max_tokens=256)
        timeout = rng.uniform(*profile.give_up_s)
    else:
        bad = rng.choice(
            [b"{", b"[]", b'{"model": "no-such-task", "messages": []}', b'{"model": "chat"}']
        )
        headers["Content-Type"] = "application/json"
        async with session.post(post, data=bad, headers=headers) as r:
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


def keys_file(path: Path) -> Path:
    """The gateway's keys for the soak: one tenant without limits, one rate-limited."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[tenants.soak]\nkeys = ["{hash_key(KEY)}"]\n\n'
        f'[tenants.limited]\nkeys = ["{hash_key(LIMITED_KEY)}"]\n'
        f"requests_per_s = {LIMITED_RATE}\n"
    )
    return path


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    until: float,
    counts: Counter[str],
    profile: Profile = VLLM_PROFILE,
) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            outcome = await one_request(session, url, kind, rng, profile)
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"exception:{type(exc).__name__}"
        counts[f"{kind} {outcome}"] += 1


async def run_load(
    url: str,
    pid: int,
    a: argparse.Namespace,
    profile: Profile,
) -> tuple[list[Sample], Counter[str], float, int]:
    """Warm up, run the mix for ``a.minutes`` sampling every ``a.interval`` s, then idle."""
    counts: Counter[str] = Counter()
    samples: list[Sample] = []
    per_task = 0
    connector = aiohttp.TCPConnector(limit=a.concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = Counter[str]()
        until = time.monotonic() + 15
        await asyncio.gather(
            *(
                worker(session, url, random.Random(a.seed - i), until, warm, profile)
                for i in range(a.concurrency)
            )
        )
        print(f"warm-up: {sum(warm.values())} requests", flush=True)
        started = time.monotonic()
        until = started + a.minutes * 60
        workers = [
            asyncio.create_task(
                worker(session, url, random.Random(a.seed + i), until, counts, profile)
            )
            for i in range(a.concurrency)
        ]
        print(
            f"{'t (s)':>7} {'RSS MiB':>8} {'FDs':>5} {'threads':>7} {'requests':>9}  rings",
            flush=True,
        )
        while True:
            now = time.monotonic()
            per_task, rings = await ring_fill(session, url)
            s = sample(pid, now - started, "load", sum(counts.values()), rings)
            samples.append(s)
            _print_sample(s, per_task)
            if now >= until:
                break
            await asyncio.sleep(min(a.interval, until - now))
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        await asyncio.sleep(5)  # idle: in-flight work done, client connections closed
        per_task, rings = await ring_fill(session, url)
    s = sample(pid, time.monotonic() - started, "idle", sum(counts.values()), rings)
    samples.append(s)
    _print_sample(s, per_task, "  (idle)")
    return samples, counts, elapsed, per_task


def _print_sample(s: Sample, per_task: int, note: str = "") -> None:
    rings = "/".join(str(n) for n in s.rings.values()) or "?"
    print(
        f"{s.t_s:7.0f} {s.rss_kib / 1024:8.1f} {s.fds:5d} {s.threads:7d} {s.requests:9d}  "
        f"{rings} of {per_task}{note}",
        flush=True,
    )


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


def longest_queue_deadline_s(tasks: tuple[str, ...]) -> float:
    """How long a ticket of the mix may be tracked: the longest queue deadline of its tasks."""
    config = load_config(None)
    return max(config.tasks[name].queue_deadline_s for name in tasks)


def start_upstream(a: argparse.Namespace, port: int, logs: Path) -> tuple[Server, dict[str, Any]]:
    """The upstream the gateway sends to, started and ready, and how to describe it."""
    if a.upstream == "fake":
        fake = fake_upstream(port, logs / "soak-fake.log", **FAKE_PACE)  # type: ignore[arg-type]
        fake.start().wait_ready("/health", 30)
        pace = "first chunk after {first_ms:g} ms, then one every {chunk_ms:g} ms".format(
            **FAKE_PACE
        )
        about = f"paced fake (loadtest/fake_upstream.py, {FAKE_PACE['chunks']} chunks, {pace})"
        return fake, {"upstream": "fake", "fake_pace": FAKE_PACE, "about": about}
    model = tiny_model(a.model)
    vllm = vllm_server(
        model, port, a.window, logs / "soak-vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "--enforce-eager",
    )  # fmt: skip
    print(f"starting vLLM on {vllm.url} ({model})", flush=True)
    try:
        vllm.start().wait_ready("/health", 600)
    except BaseException:
        vllm.stop()
        raise
    return vllm, {"upstream": "vllm", "model": model, "about": f"vLLM, tiny model {model}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", choices=("vllm", "fake"), default="vllm")
    p.add_argument("--minutes", type=float, help="load duration (default: 60, fake 20)")
    p.add_argument("--concurrency", type=int, help="clients with a request open (8, fake 32)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--model", help="tiny model folder")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="default: loadtest/results/soak[-fake].json")
    a = p.parse_args()
    fake = a.upstream == "fake"
    a.minutes = a.minutes or (20.0 if fake else 60.0)
    a.concurrency = a.concurrency or (32 if fake else 8)
    a.window = FAKE_WINDOW if fake else WINDOW
    a.out = a.out or ROOT / "loadtest" / "results" / ("soak-fake.json" if fake else "soak.json")
    profile = FAKE_PROFILE if fake else VLLM_PROFILE
    logs = ROOT / "loadtest" / "out"
    upstream_port = free_port(set())
    gateway_port = free_port({upstream_port})
    keys = keys_file(logs / "soak-keys.toml")
    with contextlib.ExitStack() as stack:
        upstream, about = start_upstream(a, upstream_port, logs)
        stack.callback(upstream.stop)
        gateway = gateway_server(
            gateway_port, upstream.url, a.window, logs / "soak-gateway.log", keys=keys
        )
        stack.callback(gateway.stop)
        gateway.start().wait_ready("/ready", 60)
        print(f"upstream: {about['about']}", flush=True)
        print(
            f"gateway {gateway.url} (pid {gateway.pid}, window {a.window}); "
            f"{a.minutes:g} min at concurrency {a.concurrency}",
            flush=True,
        )
        samples, counts, elapsed, per_task = asyncio.run(
            run_load(gateway.url, gateway.pid, a, profile)
        )
    load = [s for s in samples if s.phase == "load"]
    verdict = judge(
        [Point(s.t_s, s.rss_kib, s.rings) for s in load],
        per_task,
        longest_queue_deadline_s(MIX_TASKS),
    )
    total = sum(counts.values())
    by_status: Counter[str] = Counter()
    for key, n in counts.items():
        by_status[key.split(" ", 1)[1]] += n
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            **{k: v for k, v in about.items() if k != "about"},
            "minutes": a.minutes,
            "concurrency": a.concurrency,
            "interval_s": a.interval,
            "window": a.window,
            "mix": MIX,
            "profile": asdict(profile),
            "seed": a.seed,
        },
        "upstream": about["about"],
        "machine": asdict(describe_machine()),
        "source": source_state(),
        "rss_kib": trend(samples, "rss_kib"),
        "fds": trend(samples, "fds"),
        "threads": trend(samples, "threads"),
        "verdict": asdict(verdict),
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
    print_summary(result, verdict)
    print(f"wrote {a.out}")
    return verdict.exit_code


def _cell(value: float | None, scale: float, width: int = 9, digits: int = 1) -> str:
    return f"{value / scale:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_summary(result: dict[str, Any], verdict: Verdict) -> None:
    print()
    print(f"upstream: {result['upstream']}")
    m = result["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}")
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
            f"{_cell(t['idle'], scale)} {_cell(t['slope_per_min'], scale, 10, 3)} "
            f"{_cell(t['slope_per_min_second_half'], scale, 10, 3)}"
        )
    r = result["requests"]
    print(f"\n{r['total']} requests, {r['per_s']}/s")
    for outcome, n in r["by_outcome"].items():
        print(f"  {outcome:28} {n:7d}")
    print()
    print(verdict.line())


if __name__ == "__main__":
    sys.exit(main())

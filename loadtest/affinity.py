"""Task-affinity routing vs least-loaded on two real vLLM servers: prefix-cache hits and TTFT.

    ./launch/bench.sh affinity                 # ~8 min on 2 shared cores, the 0.5B model
    ./launch/bench.sh affinity --model tiny    # hit rate only: a tiny model's prefill is free

Two vLLM servers (one compute thread each, ``--max-num-seqs 4``) and, per routing mode in
turn, one gateway in front of both (``--routing``, window 4 fixed), replaying the same
Poisson trace (same arrivals, tasks, prompts; ``--seed``). The task table (:data:`TASKS`)
has six tasks whose system prompts are several hundred tokens long and distinct from the
first token, so a request's prefix can only come from its own task's earlier requests.

Each server's KV cache is cut to ``--blocks`` blocks (default 64 x 32 tokens = 2,048 tokens;
the six prompts are ~400 tokens each, so about five fit): a server that sees every task must
evict some prompt to admit another, which is the situation affinity is for (many tasks or
long contexts against a full cache). With an
ample cache every server ends up holding every prompt and least-loaded only pays one cold
miss per task per server; pass ``--blocks 0`` to measure that instead.

Between modes the servers' prefix caches are emptied (``POST /reset_prefix_cache``, a vLLM
development endpoint: the servers run with ``VLLM_SERVER_DEV_MODE=1``, on 127.0.0.1 only), so
the second mode does not profit from the first's cache. Reported per mode: vLLM's own
``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total`` (tokens; deltas over the
run, summed over both servers), TTFT p50/p95 per task (at the client, through the gateway),
requests per upstream (vLLM's ``vllm:request_success_total``) and per task and upstream (the
gateway's access log). Results go to ``--out`` (default ``loadtest/results/affinity``: the
JSON, a Markdown table and the task table used), the servers' logs to ``--logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtest.*` importable
    sys.path.insert(0, str(ROOT))

from loadtest.openloop import Result, run_trace  # noqa: E402
from loadtest.stack import (  # noqa: E402
    Server,
    describe_machine,
    gateway_server,
    load_average,
    source_state,
    vllm_server,
)
from loadtest.workload import Arrival  # noqa: E402

MODES = ("least-loaded", "affinity")
BLOCK_SIZE = 32  # the CPU attention backend takes multiples of 32 (its default is 128)
MAX_NUM_SEQS = 4

#: (task, role, subject, the words its rules are made of). Each system prompt is the role,
#: then numbered house rules drawn from the task's own vocabulary: several hundred tokens that
#: share nothing with another task's from the first token on.
TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "legal": (
        "You are a contract review assistant for a mid-sized law firm.",
        "commercial contracts",
        (
            "clause",
            "indemnity",
            "liability",
            "jurisdiction",
            "termination",
            "warranty",
            "counterparty",
            "governing law",
            "assignment",
            "confidentiality",
            "breach",
            "remedy",
        ),
    ),
    "medical": (
        "Clinical documentation helper for a hospital ward.",
        "discharge summaries",
        (
            "dosage",
            "allergy",
            "diagnosis",
            "follow-up",
            "vital signs",
            "medication",
            "contraindication",
            "referral",
            "symptom",
            "prognosis",
            "nurse",
            "laboratory result",
        ),
    ),
    "travel": (
        "Travel desk agent of an airline loyalty programme.",
        "itineraries",
        (
            "layover",
            "baggage",
            "fare class",
            "upgrade",
            "visa",
            "seat map",
            "check-in",
            "lounge",
            "miles",
            "rebooking",
            "connection",
            "passport",
        ),
    ),
    "finance": (
        "Accounts payable clerk at a manufacturing company.",
        "supplier invoices",
        (
            "ledger",
            "purchase order",
            "tax code",
            "remittance",
            "accrual",
            "cost centre",
            "payment terms",
            "currency",
            "reconciliation",
            "approval",
            "audit trail",
            "vendor",
        ),
    ),
    "support": (
        "First-line technical support for a home broadband provider.",
        "customer tickets",
        (
            "router",
            "firmware",
            "outage",
            "signal",
            "reboot",
            "engineer visit",
            "speed test",
            "cable",
            "password",
            "escalation",
            "modem light",
            "service area",
        ),
    ),
    "recipes": (
        "Kitchen assistant of a cookery school.",
        "recipe questions",
        (
            "braise",
            "knead",
            "proof",
            "emulsion",
            "reduction",
            "mise en place",
            "zest",
            "blanch",
            "temper",
            "fold",
            "deglaze",
            "rest",
        ),
    ),
}

VERBS = (
    "always check",
    "never skip",
    "write down",
    "double-check",
    "explain",
    "flag",
    "summarise",
    "confirm",
    "list",
    "compare",
)


def system_prompt(task: str, rules: int = 12) -> str:
    role, subject, words = TASKS[task]
    rng = random.Random(f"affinity-{task}")  # str seeds are hashed stably (sha512)
    lines = [f"{role} You answer questions about {subject}. Follow these house rules:"]
    for i in range(1, rules + 1):
        a, b = rng.sample(words, 2)
        lines.append(
            f"{i}. For {subject}, {rng.choice(VERBS)} the {a} before the {b}; "
            f"if the {a} is unclear, {rng.choice(VERBS)} the {b} and say so."
        )
    lines.append("Answer in one short sentence.")
    return "\n".join(lines)


def tasks_toml() -> str:
    """The gateway's task table: the six tasks, one class, generous deadlines (the bench
    measures routing, not SLAs)."""
    out = []
    for task in TASKS:
        out.append(
            f'[tasks.{task}]\nclass = "standard"\nsystem_prompt = {json.dumps(system_prompt(task))}\n'
            "max_tokens = 8\ntemperature = 0.0\nqueue_deadline_s = 120\ndeadline_s = 300\n"
            "max_input_tokens = 900\nsla_latency_s = 300\nsla_ttft_s = 120\n"
        )
    return "\n".join(out)


def trace(count: int, rate: float, seed: int) -> list[Arrival]:
    """``count`` Poisson arrivals at ``rate``; tasks uniform; a distinct question each."""
    rng = random.Random(seed)
    at, out = 0.0, []
    names = list(TASKS)
    for i in range(count):
        at += rng.expovariate(rate)
        task = rng.choice(names)
        _, subject, words = TASKS[task]
        prompt = f"Question {i}: about {subject}, what matters most for the {rng.choice(words)}?"
        out.append(Arrival(i, at, task, prompt, rng.randrange(2**31)))
    return out


def vllm_metrics(url: str) -> dict[str, float]:
    wanted = (
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:request_success_total",
    )
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    totals = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def post(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        answer: dict[str, Any] = json.loads(r.read() or b"{}")
        return answer


def reset_prefix_caches(servers: Sequence[Server], timeout_s: float = 60) -> None:
    """Empty each server's prefix cache; vLLM refuses while blocks are held, so retry."""
    deadline = time.monotonic() + timeout_s
    for server in servers:
        while not post(server.url + "/reset_prefix_cache").get("success"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.url} would not reset its prefix cache")
            time.sleep(0.5)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def routed(log_path: Path) -> dict[str, dict[str, int]]:
    """Requests per task and upstream, from the gateway's JSON access log."""
    counts: dict[str, Counter[str]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("task") in TASKS and record.get("upstream"):
            counts.setdefault(record["task"], Counter())[record["upstream"]] += 1
    return {task: dict(sorted(c.items())) for task, c in sorted(counts.items())}


def run_mode(
    mode: str, servers: Sequence[Server], arrivals: list[Arrival], args: argparse.Namespace
) -> dict[str, Any]:
    tasks_path = args.out / "tasks.toml"
    log_path = args.logs / f"gateway-{mode}.log"
    gateway = gateway_server(
        args.gateway_port,
        ",".join(s.url for s in servers),
        MAX_NUM_SEQS,
        log_path,
        tasks=tasks_path,
        extra=[
            "--window-mode",
            "fixed",
            "--routing",
            mode,
            "--access-log",
            "on",
            "--log-level",
            "info",
            "--health-interval",
            "0.5",
        ],
    )
    reset_prefix_caches(servers)
    before = [vllm_metrics(s.url) for s in servers]
    gateway.start()
    try:
        gateway.wait_ready("/ready", 60)
        model = args.model_name

        def body(arrival: Arrival) -> dict[str, Any]:
            return {
                "model": arrival.task,
                "messages": [{"role": "user", "content": arrival.prompt}],
                "stream": True,
                "seed": arrival.seed,
            }

        started = time.monotonic()
        results: list[Result] = asyncio.run(
            run_trace(gateway.url + "/v1/chat/completions", arrivals, body, args.drain_s)
        )
        wall_s = time.monotonic() - started
    finally:
        gateway.stop()
    after = [vllm_metrics(s.url) for s in servers]
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    hits = sum(d["vllm:prefix_cache_hits_total"] for d in delta)
    queries = sum(d["vllm:prefix_cache_queries_total"] for d in delta)
    ttft: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        values = [r.ttft for r in results if r.task == task and r.ttft is not None]
        ttft[task] = {
            "n": len(values),
            "p50_s": percentile(values, 0.5),
            "p95_s": percentile(values, 0.95),
        }
    everything = [r.ttft for r in results if r.ttft is not None]
    return {
        "mode": mode,
        "model": model,
        "wall_s": round(wall_s, 1),
        "outcomes": dict(Counter(r.outcome for r in results)),
        "prefix_cache_hits_tokens": hits,
        "prefix_cache_queries_tokens": queries,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "requests_per_upstream": {
            s.url.split("://", 1)[1]: d["vllm:request_success_total"]
            for s, d in zip(servers, delta, strict=True)
        },
        "requests_per_task_and_upstream": routed(log_path),
        "ttft_all": {
            "n": len(everything),
            "p50_s": percentile(everything, 0.5),
            "mean_s": statistics.fmean(everything) if everything else None,
            "p95_s": percentile(everything, 0.95),
        },
        "ttft_per_task": ttft,
        "load_average_after": load_average(),
    }


def markdown(report: dict[str, Any]) -> str:
    runs = {r["mode"]: r for r in report["runs"]}
    lines = [
        f"# Affinity vs least-loaded ({report['when']})",
        "",
        f"Machine: {report['machine']} (shared with other work: load average "
        f"{report['load_average_before']} at the start).",
        f"Model: {report['model']}; two vLLM servers, one compute thread each, max-num-seqs "
        f"{MAX_NUM_SEQS}, KV cache {report['kv_cache']}; {report['requests']} requests per mode "
        f"at {report['rate']}/s, seed {report['seed']}, run in the order {report['order']}; commit {report['source']['commit'][:10]}.",
        "",
        "| | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(runs[m]) for m in MODES) + " |")

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    row("prefix-cache hit rate (vLLM, tokens)", lambda r: f"{r['prefix_cache_hit_rate']:.1%}")
    row(
        "hits / queries (tokens)",
        lambda r: f"{r['prefix_cache_hits_tokens']:.0f} / {r['prefix_cache_queries_tokens']:.0f}",
    )
    row("TTFT p50, all", lambda r: sec(r["ttft_all"]["p50_s"]))
    row("TTFT mean, all", lambda r: sec(r["ttft_all"]["mean_s"]))
    row("TTFT p95, all", lambda r: sec(r["ttft_all"]["p95_s"]))
    for task in TASKS:
        row(
            f"TTFT p50 / p95, {task}",
            lambda r, t=task: (
                f"{sec(r['ttft_per_task'][t]['p50_s'])} / {sec(r['ttft_per_task'][t]['p95_s'])}"
            ),
        )
    row(
        "requests per upstream",
        lambda r: ", ".join(f"{v:.0f}" for v in r["requests_per_upstream"].values()),
    )
    row("outcomes", lambda r: ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()))
    lines += ["", "Requests per task and upstream (gateway access log):", ""]
    for mode in MODES:
        per = runs[mode]["requests_per_task_and_upstream"]
        lines.append(
            f"- {mode}: "
            + "; ".join(f"{t} " + "/".join(str(n) for n in c.values()) for t, c in per.items())
        )
    a, b = runs["affinity"], runs["least-loaded"]
    if a["ttft_all"]["p50_s"] and b["ttft_all"]["p50_s"]:
        lines += [
            "",
            f"Ratios (affinity / least-loaded): hit rate "
            f"{a['prefix_cache_hit_rate'] / b['prefix_cache_hit_rate']:.2f}x, TTFT p50 "
            f"{a['ttft_all']['p50_s'] / b['ttft_all']['p50_s']:.2f}x, TTFT p95 "
            f"{a['ttft_all']['p95_s'] / b['ttft_all']['p95_s']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", choices=("default", "tiny"), default="default")
    p.add_argument("--requests", type=int, default=80, help="per mode")
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per second")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument(
        "--modes", default=",".join(MODES), help="the order to run them in (a repeat can flip it)"
    )
    p.add_argument("--blocks", type=int, default=64, help="KV blocks per server (0: vLLM's own)")
    p.add_argument("--drain-s", type=float, default=120.0)
    p.add_argument("--vllm-ports", default="18201,18202")
    p.add_argument("--gateway-port", type=int, default=18210)
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "affinity")
    p.add_argument("--logs", type=Path, default=ROOT / "loadtest" / "out" / "affinity")
    args = p.parse_args(argv)
    if sorted(args.modes.split(",")) != sorted(MODES):
        p.error(f"--modes must name {' and '.join(MODES)}, once each, in some order")
    return args


def model_path(kind: str) -> str:
    env, name = {
        "default": ("QWEN_GATEWAY_DEFAULT_MODEL", "qwen2.5-coder-0.5b-instruct"),
        "tiny": ("QWEN_GATEWAY_TINY_MODEL", "tiny-qwen2"),
    }[kind]
    cache = Path(os.environ.get("QWEN_GATEWAY_CACHE", Path.home() / ".cache" / "qwen-gateway"))
    return os.environ.get(env, str(cache / "models" / name))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    (args.out / "tasks.toml").write_text(tasks_toml(), encoding="utf-8")
    model = model_path(args.model)
    args.model_name = Path(model).name
    machine = describe_machine()
    print(f"machine: {machine.markdown()}; load average {load_average()}", flush=True)
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "MAX_MODEL_LEN": "1024",
        "VLLM_SERVER_DEV_MODE": "1",
    }
    extra = ["--block-size", str(BLOCK_SIZE)]
    if args.blocks:
        extra += ["--num-gpu-blocks-override", str(args.blocks)]
    ports = [int(p) for p in args.vllm_ports.split(",")]
    servers = [
        vllm_server(model, port, MAX_NUM_SEQS, args.logs / f"vllm-{port}.log", env, *extra)
        for port in ports
    ]
    report: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.markdown(),
        "load_average_before": load_average(),
        "model": args.model_name,
        "kv_cache": (
            f"{args.blocks} blocks x {BLOCK_SIZE} tokens per server"
            if args.blocks
            else "vLLM's default (1 GiB)"
        ),
        "requests": args.requests,
        "rate": args.rate,
        "seed": args.seed,
        "order": args.modes,
        "source": source_state(),
        "prompt_chars": {t: len(system_prompt(t)) for t in TASKS},
        "runs": [],
    }
    try:
        for server in servers:
            server.start()
        for server in servers:
            print(
                f"vLLM {server.url} ready in {server.wait_ready('/health', 900):.0f} s", flush=True
            )
        arrivals = trace(args.requests, args.rate, args.seed)
        for mode in args.modes.split(","):
            print(f"running {mode} ...", flush=True)
            run = run_mode(mode, servers, arrivals, args)
            report["runs"].append(run)
            print(json.dumps(run, indent=1), flush=True)
    finally:
        for server in servers:
            server.stop()
    (args.out / "affinity.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out / "affinity.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out}/affinity.json and affinity.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

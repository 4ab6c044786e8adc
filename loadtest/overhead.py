"""Measure what the gateway adds on top of an instant upstream, on this machine, in one command.

    ./launch/bench.sh overhead [--duration 10] [--rounds 3] [--out loadtest/out/overhead.json]

It starts ``loadtest/fake_upstream.py`` and two gateways in front of it (access log on and
off; a dispatch window so large it never limits), checks that each answers correctly, then
drives every target with ``wrk -t1`` through ``loadtest/wrk/post_json.lua``:

    json_c1    non-streaming chat, 1 connection     -> p50, so added p50 = gateway - direct
    json_c16   non-streaming chat, 16 connections   -> req/s, p99, added p99
               (direct is also run paced to ~4,000 req/s, the gateway's load: flat out, the
               fake and wrk saturate both cores and its p99 is scheduling noise, not a baseline)
    sse_c16    50-chunk streaming chat, 16 conns    -> streams/s, p99

Rounds interleave the targets so drift hits them alike; every figure is a median over rounds.
CPU per request is the target process's utime+stime (/proc/PID/stat) over the run divided by
the requests wrk completed. Any non-2xx answer or socket error aborts the run (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA = HERE / "wrk" / "post_json.lua"
CHUNKS = 50
WARMUP_S = 2

TARGETS = {  # issue 9: against the minimal proxy measured in the same run
    "json_c16_rps_vs_minimal": 0.5,
    "sse_c16_rps_vs_minimal": 0.5,
    "json_c1_added_p50_ms": 0.5,
}
MINIMAL = "minimal proxy"


class Failure(Exception):
    """The measurement cannot be trusted (a server did not start, or answered errors)."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    connections: int
    stream: bool
    delay_ms: int = 0  # per connection, between an answer and the next request


SCENARIOS = (
    Scenario("json_c1", 1, stream=False),
    Scenario("json_c16", 16, stream=False),
    Scenario("sse_c16", 16, stream=True),
)
#: The p99 baseline for "added p99": the fake at about the load a gateway reaches (16 / 4 ms).
PACED = Scenario("json_c16_paced", 16, stream=False, delay_ms=4)


@dataclass(frozen=True, slots=True)
class Target:
    """Something wrk can load: the fake directly, or a gateway in front of it."""

    name: str
    base_url: str
    model: str
    pid: int
    key: str | None = None  # an API key, sent as Authorization: Bearer

    def body(self, stream: bool) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 16,
        }
        if stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run against one target; latencies in microseconds, CPU in microseconds."""

    target: str
    scenario: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    cpu_us_per_request: float  # the target process only
    wrk_cpu_pct: float  # of one core
    foreign_cpu_pct: float  # of the whole machine, by processes that are not ours


# -- processes ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent by processes, all cores together, since boot.

    Interrupt time is left out: loopback traffic's softirq work is ours but is charged to no
    process, so counting it would show our own load as other processes'.
    """
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_ok(url: str, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failure(f"{process.args!r} exited with {process.returncode}")
        try:
            if url.startswith("tcp://"):  # a server that speaks no HTTP: listening is ready
                host, port = url.removeprefix("tcp://").rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=1):
                    return
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise Failure(f"{url} did not answer 200 within {timeout_s} s")


@contextmanager
def server(args: list[str], ready_url: str, log: Path, stdout: Path | None = None) -> Iterator[int]:
    """Run a server process until the block ends; stop it by its own PID."""
    with ExitStack() as files:
        err = files.enter_context(open(log, "wb"))
        out = files.enter_context(open(stdout, "wb")) if stdout else err
        process = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err)
    try:
        wait_until_ok(ready_url, process)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- checks ---------------------------------------------------------------------------------


def post(url: str, body: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def check_answers(target: Target) -> None:
    """One request of each kind, by hand, before trusting wrk's counts."""
    url = target.base_url + "/v1/chat/completions"
    status, raw = post(url, target.body(stream=False), target.key)
    answer = json.loads(raw)
    if status != 200 or not answer["choices"][0]["message"]["content"]:
        raise Failure(f"{target.name}: bad chat answer {status} {raw[:200]!r}")
    status, raw = post(url, target.body(stream=True), target.key)
    events = [e for e in raw.split(b"\n\n") if e]
    content = [e for e in events if b'"delta":{"content"' in e]
    if status != 200 or len(content) != CHUNKS or events[-1] != b"data: [DONE]":
        raise Failure(
            f"{target.name}: bad stream {status}: {len(content)} content chunks "
            f"(want {CHUNKS}), last event {events[-1][:80]!r}"
        )


# -- wrk ------------------------------------------------------------------------------------


def wrk(target: Target, scenario: Scenario, seconds: float) -> tuple[dict[str, Any], str, float]:
    """Run wrk once; return its WRK_JSON figures, its text output and its CPU seconds."""
    url = target.base_url + "/v1/chat/completions"
    args = [
        "wrk", "-t1", f"-c{scenario.connections}", f"-d{seconds:g}s", "--latency",
        "--timeout", "5s", "-s", str(LUA), url,
    ]  # fmt: skip
    if target.key is not None:
        args[1:1] = ["-H", f"Authorization: Bearer {target.key}"]
    env = {**os.environ, "WRK_BODY": target.body(scenario.stream)}
    if scenario.delay_ms:
        env["WRK_DELAY_MS"] = str(scenario.delay_ms)
    before = children_cpu_seconds()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    wrk_cpu = children_cpu_seconds() - before
    if done.returncode != 0:
        raise Failure(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise Failure(f"no WRK_JSON line in wrk's output:\n{done.stdout}")
    figures: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    errors = {k: v for k, v in figures["errors"].items() if v}
    if errors or "Non-2xx" in done.stdout or figures["requests"] == 0:
        raise Failure(f"{target.name} {scenario.name}: errors {errors}\n{done.stdout}")
    return figures, done.stdout, wrk_cpu


def others_busy_pct(ours: list[int], seconds: float = 1.0) -> float:
    """Share of the machine (all cores, percent) used by processes that are not ours."""
    busy0, ours0, t0 = machine_busy_seconds(), sum(map(cpu_seconds, ours)), time.monotonic()
    time.sleep(seconds)
    busy = machine_busy_seconds() - busy0 - (sum(map(cpu_seconds, ours)) - ours0)
    return 100 * max(busy, 0.0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))


def wait_for_quiet(ours: list[int], threshold_pct: float, max_wait_s: float) -> None:
    """This machine is shared: let other work (a test suite, a vLLM) finish before measuring."""
    started = time.monotonic()
    busy = others_busy_pct(ours)
    if busy <= threshold_pct:
        return
    print(f"  waiting for quiet: other processes use {busy:.0f}% of the machine", flush=True)
    while (busy := others_busy_pct(ours)) > threshold_pct:
        if time.monotonic() - started > max_wait_s:
            print(f"  still {busy:.0f}% after {max_wait_s:g} s; measuring anyway", flush=True)
            return
    print(f"  quiet after {time.monotonic() - started:.0f} s", flush=True)


def measure(
    target: Target, scenario: Scenario, round_: int, seconds: float, ours: list[int]
) -> Run:
    cpu0 = cpu_seconds(target.pid)
    ours0 = sum(cpu_seconds(pid) for pid in ours)
    busy0, t0 = machine_busy_seconds(), time.monotonic()
    figures, _, wrk_cpu = wrk(target, scenario, seconds)
    elapsed = time.monotonic() - t0
    foreign = (
        machine_busy_seconds() - busy0 - wrk_cpu - (sum(cpu_seconds(pid) for pid in ours) - ours0)
    )
    cpu = cpu_seconds(target.pid) - cpu0
    requests = figures["requests"]
    wall = figures["duration_us"] / 1e6
    latency = figures["latency_us"]
    return Run(
        target=target.name,
        scenario=scenario.name,
        round=round_,
        requests=requests,
        seconds=round(wall, 3),
        rps=round(requests / wall, 1),
        p50_us=latency["p50"],
        p90_us=latency["p90"],
        p99_us=latency["p99"],
        cpu_us_per_request=round(cpu * 1e6 / requests, 1),
        wrk_cpu_pct=round(100 * wrk_cpu / elapsed, 1),
        foreign_cpu_pct=round(100 * max(foreign, 0.0) / (elapsed * (os.cpu_count() or 1)), 1),
    )


def measure_quietly(
    target: Target,
    scenario: Scenario,
    round_: int,
    args: argparse.Namespace,
    ours: list[int],
    notes: list[str],
) -> Run:
    """One run on a quiet machine: redo it if it failed (once) or others disturbed it.

    Of the runs disturbed by other processes, the least disturbed is kept after --attempts.
    """
    what = f"round {round_} {scenario.name} {target.name}"
    best: Run | None = None
    failures = attempts = 0
    while True:
        wait_for_quiet(ours, args.quiet_pct, args.max_wait)
        try:
            run = measure(target, scenario, round_, args.duration, ours)
        except Failure as exc:  # a stall on this shared machine can time requests out
            failures += 1
            if failures > 1:
                raise
            notes.append(f"{what}: failed, redone: {exc}")
            print(f"  FAILED, redoing once: {exc}", flush=True)
            continue
        attempts += 1
        if best is None or run.foreign_cpu_pct < best.foreign_cpu_pct:
            best = run
        if run.foreign_cpu_pct <= 2 * args.quiet_pct or attempts >= args.attempts:
            return best
        notes.append(f"{what}: others used {run.foreign_cpu_pct:.0f}% of the machine, redone")
        print(f"  {what}: others used {run.foreign_cpu_pct:.0f}% of the machine; redoing")


# -- report ---------------------------------------------------------------------------------


def summarise(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """Median of every figure over rounds: summary[target][scenario][figure]."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    figures = ("rps", "p50_us", "p90_us", "p99_us", "cpu_us_per_request", "foreign_cpu_pct")
    for run in runs:
        out.setdefault(run.target, {}).setdefault(run.scenario, {})
    for target, scenarios in out.items():
        for scenario in scenarios:
            mine = [r for r in runs if r.target == target and r.scenario == scenario]
            scenarios[scenario] = {
                f: statistics.median(getattr(r, f) for r in mine) for f in figures
            }
    return out


def added(summary: dict[str, dict[str, dict[str, float]]], target: str) -> dict[str, float]:
    gw, direct = summary[target], summary["direct"]
    return {
        "json_c1_added_p50_ms": (gw["json_c1"]["p50_us"] - direct["json_c1"]["p50_us"]) / 1000,
        "json_c16_added_p99_ms": (gw["json_c16"]["p99_us"] - direct[PACED.name]["p99_us"]) / 1000,
        "json_c16_rps": gw["json_c16"]["rps"],
        "sse_c16_rps": gw["sse_c16"]["rps"],
    }


def verdicts(extra: dict[str, float]) -> dict[str, bool]:
    return {
        name: extra[name] <= target if name.endswith("_ms") else extra[name] >= target
        for name, target in TARGETS.items()
    }


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    head = (
        "| target | p50 at 1 conn (added) | req/s at 16 | p99 at 16 (added) "
        "| 50-chunk SSE streams/s at 16 (p99) | CPU us/request at 16 | CPU us/stream |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    direct = summary["direct"]
    for target, s in summary.items():
        c1, c16, sse = s["json_c1"], s["json_c16"], s["sse_c16"]
        if target == "direct":
            paced = s[PACED.name]
            p50 = f"{c1['p50_us']:,.0f} us"
            p99 = (
                f"{c16['p99_us'] / 1000:.2f} ms; {paced['p99_us'] / 1000:.2f} ms "
                f"at {paced['rps']:,.0f}/s"
            )
        else:
            p50 = f"{c1['p50_us']:,.0f} us (+{c1['p50_us'] - direct['json_c1']['p50_us']:,.0f} us)"
            gap = (c16["p99_us"] - direct[PACED.name]["p99_us"]) / 1000
            p99 = f"{c16['p99_us'] / 1000:.2f} ms (+{gap:.2f} ms)"
        rows.append(
            f"| {target} | {p50} | {c16['rps']:,.0f} | {p99} "
            f"| {sse['rps']:,.0f} ({sse['p99_us'] / 1000:.1f} ms) "
            f"| {c16['cpu_us_per_request']:,.0f} | {sse['cpu_us_per_request']:,.0f} |"
        )
    return head + "\n".join(rows)


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    dirty = git("status", "--porcelain", "--", "gateway")
    return {
        "gateway_commit": git("rev-parse", "--short", "HEAD")
        + (" + local changes" if dirty else ""),
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version.split("[")[0].strip() or wrk_version.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- with Redis (issue 13) --------------------------------------------------------------------

#: The tenant of the Redis target: limits high enough never to refuse, so that every request
#: runs the shared-limits scripts (admission, then the end's write) and never a refusal.
REDIS_KEY = "sk-overhead"


def with_redis(
    stack: ExitStack, py: str, fake_url: str, port: int, tmp: Path, logs: Path,
    args: argparse.Namespace,
) -> Target:  # fmt: skip
    """A third gateway, access log off like the second, sharing state through a real local
    redis-server: its API key's tenant has a request rate, a token rate and a concurrency cap
    (every request runs the shared-limits scripts), and its window is leased."""
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise Failure("redis-server is not installed; as root: apt-get install -y redis-server")
    redis_port = port + 1
    stack.enter_context(
        server(
            [redis_bin, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no"],
            f"tcp://127.0.0.1:{redis_port}", logs / "overhead-redis.log",
        )
    )  # fmt: skip
    keys = tmp / "keys.toml"
    digest = "sha256:" + hashlib.sha256(REDIS_KEY.encode()).hexdigest()
    keys.write_text(
        f'[tenants.bench]\nkeys = ["{digest}"]\nrequests_per_s = 1000000\n'
        "tokens_per_s = 100000000\nmax_concurrent = 100000\n"
    )
    pid = stack.enter_context(
        server(
            [py, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
             "--upstreams", fake_url, "--window", str(args.window), "--access-log", "off",
             "--log-level", "warning", "--redis", f"redis://127.0.0.1:{redis_port}/0",
             "--keys", str(keys)],
            f"http://127.0.0.1:{port}/ready",
            logs / "overhead-gateway-redis.log",
        )
    )  # fmt: skip
    return Target(REDIS_TARGET, f"http://127.0.0.1:{port}", "chat", pid, key=REDIS_KEY)


REDIS_TARGET = "gateway, Redis"


# -- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    py = sys.executable
    fake_port, base = args.port_base, args.port_base + 1
    fake_url = f"http://127.0.0.1:{fake_port}"
    logs = Path(args.out).parent
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        fake_pid = stack.enter_context(
            server(
                [py, str(HERE / "fake_upstream.py"), "--port", str(fake_port),
                 "--chunks", str(CHUNKS)],
                fake_url + "/health",
                logs / "overhead-fake.log",
            )
        )  # fmt: skip
        targets = [Target("direct", fake_url, "fake", fake_pid)]
        minimal_port = base + 2
        minimal_pid = stack.enter_context(
            server(
                [py, str(HERE / "minimal_proxy.py"), "--port", str(minimal_port),
                 "--upstream", fake_url],
                f"http://127.0.0.1:{minimal_port}/health",
                logs / "overhead-minimal.log",
            )
        )  # fmt: skip
        targets.append(Target(MINIMAL, f"http://127.0.0.1:{minimal_port}", "fake", minimal_pid))
        access_logs: dict[str, Path] = {}
        for i, access in enumerate(("on", "off")):
            port = base + 3 + i
            name = f"gateway, access log {access}"
            access_logs[name] = Path(tmp) / f"access-{access}.jsonl"
            pid = stack.enter_context(
                server(
                    [py, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
                     "--upstreams", fake_url, "--window", str(args.window),
                     "--access-log", access, "--log-level", "warning"],
                    f"http://127.0.0.1:{port}/ready",
                    logs / f"overhead-gateway-{access}.log",
                    stdout=access_logs[name],
                )
            )  # fmt: skip
            targets.append(Target(name, f"http://127.0.0.1:{port}", "chat", pid))
        if args.redis:
            targets.append(with_redis(stack, py, fake_url, base + 5, Path(tmp), logs, args))
        ours = [t.pid for t in targets]
        wait_for_quiet(ours, args.quiet_pct, args.max_wait)
        for target in targets:
            check_answers(target)
            for scenario in SCENARIOS:
                wrk(target, scenario, WARMUP_S)
        runs: list[Run] = []
        notes: list[str] = []
        plan = [(s, t) for s in SCENARIOS for t in targets]
        plan.insert(plan.index((SCENARIOS[1], targets[0])) + 1, (PACED, targets[0]))
        for round_ in range(1, args.rounds + 1):
            for scenario, target in plan:
                result = measure_quietly(target, scenario, round_, args, ours, notes)
                runs.append(result)
                print(
                    f"round {round_} {scenario.name:14} {target.name:23} "
                    f"{result.rps:8,.0f}/s p50 {result.p50_us:6,} us "
                    f"p99 {result.p99_us:7,} us cpu {result.cpu_us_per_request:4,.0f} us/req "
                    f"(others {result.foreign_cpu_pct:.0f}%)",
                    flush=True,
                )
        logged = {name: path.read_bytes().count(b"\n") for name, path in access_logs.items()}
    if logged["gateway, access log on"] == 0 or logged["gateway, access log off"] != 0:
        raise Failure(f"access log lines are not as configured: {logged}")
    summary = summarise(runs)
    gateways = {t: added(summary, t) for t in summary if t != "direct"}
    for extra in gateways.values():
        for scenario in ("json_c16", "sse_c16"):
            extra[f"{scenario}_rps_vs_minimal"] = round(
                extra[f"{scenario}_rps"] / summary[MINIMAL][scenario]["rps"], 3
            )
    return {
        "machine": machine(),
        "config": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "window": args.window,
            "chunks": CHUNKS,
            "wrk_threads": 1,
            "scenarios": [asdict(s) for s in (*SCENARIOS, PACED)],
        },
        "targets": TARGETS,
        "summary": summary,
        "gateway": {t: {**g, "pass": verdicts(g)} for t, g in gateways.items()},
        "access_log_lines": logged,
        "notes": notes,
        "runs": [asdict(r) for r in runs],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--out", default=str(HERE / "out" / "overhead.json"), help="JSON results")
    p.add_argument(
        "--port-base", type=int, default=19010, help="fake on it, minimal proxy +2, gateways +3, +4"
    )
    p.add_argument("--window", type=int, default=1_000_000, help="gateway dispatch window")
    p.add_argument(
        "--redis",
        action="store_true",
        help="also a gateway sharing state through a local redis-server (port base +6, +7)",
    )
    p.add_argument(
        "--quiet-pct",
        type=float,
        default=5.0,
        help="before each run, wait until other processes use at most this %% of the machine",
    )
    p.add_argument("--max-wait", type=float, default=180.0, help="longest wait for quiet, s")
    p.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="runs disturbed by other processes (over twice --quiet-pct) are redone up to this",
    )
    args = p.parse_args()
    # Stopped by a signal, still stop the servers (the with-blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        print("wrk is not installed; as root: apt-get update && apt-get install -y wrk")
        return 2
    try:
        result = run(args)
    except Failure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"\ngateway {m['gateway_commit']}; {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
          f"{m['wrk']}, {m['date']}")  # fmt: skip
    print(f"wrk -t1, {args.duration:g} s per run, medians of {args.rounds} rounds; "
          f"gateway window {args.window:,}\n")  # fmt: skip
    print(table(result["summary"]))
    print()
    for name, g in result["gateway"].items():
        verdict = ", ".join(f"{k} {'ok' if ok else 'MISSED'}" for k, ok in g["pass"].items())
        print(
            f"{name}: added p50 {g['json_c1_added_p50_ms'] * 1000:,.0f} us, "
            f"added p99 {g['json_c16_added_p99_ms']:.2f} ms, {g['json_c16_rps']:,.0f} req/s "
            f"({g['json_c16_rps_vs_minimal']:.2f}x the minimal proxy), "
            f"{g['sse_c16_rps']:,.0f} streams/s ({g['sse_c16_rps_vs_minimal']:.2f}x) -> {verdict}"
        )
    disturbed = [r for r in result["runs"] if r["foreign_cpu_pct"] > 2 * args.quiet_pct]
    if disturbed:
        print(
            f"\nWARNING: other processes used over {2 * args.quiet_pct:g}% of the machine during "
            f"{len(disturbed)} of {len(result['runs'])} runs; their figures are low "
            "(foreign_cpu_pct in the JSON's runs)"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

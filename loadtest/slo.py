"""The SLO benchmark: does the gateway keep each class's promises when vLLM is overloaded?

    ./launch/bench.sh slo            # the full run, ~25 min on 2 cores
    ./launch/bench.sh slo --quick    # a ~6 min version for trying it out
    python loadtest/slo.py --upstream sim --preset h100-7b --servers 4   # SIMULATED vLLM

With ``--upstream sim`` the servers are simulated vLLMs (``loadtest/sim_vllm.py``: no model,
tokens timed by a model of continuous batching; see ``loadtest/README-sim.md``), ``--servers``
of them in one process; a and b spread requests over them round-robin, the gateway gets
them all as its upstreams. Capacity is then the model's own (a virtual-time closed loop at
``max_num_seqs`` per server), and runs are shorter (``SIM``). ``./launch/bench.sh sim``
runs this at one and four servers (``loadtest/sim_bench.py``).

One vLLM (the real default model, ``--max-num-seqs 8``) serves three configurations in one
run, replaying the same open-loop Poisson trace (arrival times, prompts, seeds) for each:

    a  vLLM alone, FCFS: every request at vLLM priority 0 (ties go to the earlier arrival)
    b  vLLM alone, static priority from the task's class (realtime -100 ... batch -10)
    c  through the gateway (window = max-num-seqs = 8)

First it measures capacity (completions per second of the mix with ``max-num-seqs``
requests in flight at vLLM alone); then it runs each configuration at multiples of it
(0.5x, 1x, 1.5x, 2x), configurations interleaved per level so drift on a shared machine hits
all three alike. Outputs go to ``--out`` (default ``loadtest/results``): ``slo.json`` (every
number, per run and summarized), ``slo.md`` (the tables), ``slo-requests.csv`` (one line per
request) and two PNGs. See ``loadtest/slo_report.py`` for the definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import itertools
import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtest.*` importable
    sys.path.insert(0, str(ROOT))

from gateway.config import Config, load_config  # noqa: E402
from loadtest import slo_report  # noqa: E402
from loadtest.openloop import Result, run_closed, run_trace  # noqa: E402
from loadtest.sim_calibrate import capacity as sim_capacity  # noqa: E402
from loadtest.sim_engine import PRESETS  # noqa: E402
from loadtest.stack import (  # noqa: E402
    Server,
    cpu_seconds,
    describe_machine,
    gateway_server,
    load_average,
    machine_busy_seconds,
    sim_server,
    source_state,
    vllm_server,
)
from loadtest.workload import (  # noqa: E402
    LOADS,
    Arrival,
    PriorityMode,
    arrivals,
    client_body,
    parse_mix,
    poisson_trace,
    vllm_body,
)

#: The default model as the launchers build it (./launch/bench.sh slo sets the variable).
DEFAULT_MODEL = os.environ.get("QWEN_GATEWAY_DEFAULT_MODEL") or str(
    Path(os.environ.get("QWEN_GATEWAY_CACHE") or Path.home() / ".cache/qwen-gateway")
    / "models/qwen2.5-coder-0.5b-instruct"
)
DEFAULT_MIX = "sentiment=5,chat=3,summarize=1,batch=1"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Plan:
    levels: tuple[float, ...]
    configs: tuple[str, ...]
    duration_s: float
    warmup_s: float
    drain_s: float
    capacity_s: float
    capacity_warmup_s: float
    repeats: int
    budget_s: float
    seed: int


FULL = Plan(
    levels=(0.5, 1.0, 1.5, 2.0),
    configs=("a", "b", "c"),
    duration_s=60,
    warmup_s=10,
    drain_s=60,
    capacity_s=60,
    capacity_warmup_s=15,
    repeats=1,
    budget_s=30 * 60,  # a safety net: the plan itself takes ~23 min
    seed=20261121,
)
QUICK = replace(
    FULL,
    levels=(0.5, 1.5),
    duration_s=30,
    warmup_s=5,
    drain_s=30,
    capacity_s=30,
    capacity_warmup_s=10,
    budget_s=8 * 60,
)
#: GPU-scale rates with a simulated vLLM: hundreds of requests a second on two cores, so
#: shorter runs (each still holds thousands of requests).
SIM = replace(
    FULL,
    duration_s=15,
    warmup_s=5,
    drain_s=10,
    capacity_s=60,
    capacity_warmup_s=15,
    budget_s=14 * 60,
)


class Bench:
    """Owns the servers and runs the plan; results accumulate in ``self.runs``."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.argv: list[str] = getattr(args, "argv", [])
        self.plan = plan
        self.config: Config = load_config()
        self.mix = parse_mix(args.mix)
        self.out: Path = args.out
        self.logs = args.logs
        self.started = time.monotonic()
        self.source = source_state()  # at the start: others may edit the gateway meanwhile
        self.vllm: Server | None = None
        self.vllm_url: str = args.vllm_url or f"http://127.0.0.1:{args.port}"
        self.vllm_urls = [self.vllm_url]
        if args.upstream == "sim":
            self.vllm_urls = [f"http://127.0.0.1:{args.port + i}" for i in range(args.servers)]
        self.model_id = ""
        self.runs: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []

    # -- servers -------------------------------------------------------------------

    def start_vllm(self) -> None:
        if self.args.vllm_url:
            print(f"using the running vLLM at {self.vllm_url}", flush=True)
        elif self.args.upstream == "sim":
            self.vllm = sim_server(
                self.args.port,
                self.args.servers,
                self.args.preset,
                self.args.max_num_seqs,
                self.args.sim_speed,
                self.logs / "sim-vllm.log",
            ).start()
            print(
                f"starting {self.args.servers} simulated vLLM(s) (pid {self.vllm.pid})", flush=True
            )
            self.vllm.wait_ready("/health", timeout_s=60)
            for url in self.vllm_urls[1:]:
                _wait_health(url)
        else:
            self.vllm = vllm_server(
                self.args.model,
                self.args.port,
                self.args.max_num_seqs,
                self.logs / "vllm.log",
                {
                    "VLLM_CPU_KVCACHE_SPACE": str(self.args.kv_cache_gib),
                    "VLLM_CPU_OMP_THREADS_BIND": self.args.omp_bind,
                    "OMP_NUM_THREADS": "1",  # one compute thread, as vLLM's own binding uses
                },
                *self.args.vllm_extra,
            ).start()
            print(f"starting vLLM on {self.vllm_url} (pid {self.vllm.pid})...", flush=True)
            took = self.vllm.wait_ready("/health", timeout_s=600)
            print(f"vLLM ready after {took:.0f} s", flush=True)
        with urllib.request.urlopen(self.vllm_url + "/v1/models", timeout=10) as r:
            self.model_id = json.load(r)["data"][0]["id"]

    def stop(self) -> None:
        if self.vllm is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut this short
            self.vllm.stop()
            print("vLLM stopped", flush=True)

    def vllm_pids(self) -> list[int]:
        """The vLLM API server and every process in its group (engine core, worker)."""
        if self.vllm is None:
            return []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.vllm.pid:  # process group id
                pids.append(int(stat.parent.name))
        return pids

    def vllm_cpu(self, pids: Sequence[int]) -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that has just exited
                total += cpu_seconds(pid)
        return total

    def wait_vllm_idle(self, timeout_s: float = 90) -> None:
        """Let aborted or leftover requests clear so the next run starts from an empty vLLM."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 0.0
            for url in self.vllm_urls:
                with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                    text = r.read().decode()
                busy += sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
                )
            if busy == 0:
                return
            time.sleep(1)
        print("warning: vLLM still busy before the next run", flush=True)

    # -- requests ------------------------------------------------------------------

    def body_for(self, cfg: str, prefix: str) -> Any:
        def body(arrival: Arrival) -> dict[str, Any]:
            client = client_body(LOADS[arrival.task], arrival.prompt, arrival.seed, prefix)
            if cfg in ("c", "d"):
                return client
            mode: PriorityMode = "fcfs" if cfg == "a" else "class"
            return vllm_body(self.config, client, self.model_id, mode)

        return body

    def warm_up(self) -> None:
        """One request per task at vLLM, so first-use costs (grammar compile) are not measured."""
        trace = [
            Arrival(i, 0.1 * i, task, LOADS[task].prompts[0], i) for i, task in enumerate(self.mix)
        ]
        results = asyncio.run(
            run_trace(self.vllm_url + CHAT, trace, self.body_for("a", "[warm-up] "), 120)
        )
        print("warm-up:", ", ".join(f"{r.task} {r.outcome}" for r in results), flush=True)

    # -- capacity ------------------------------------------------------------------

    def measure_capacity(self) -> dict[str, Any]:
        if self.args.capacity:
            return {"rate_rps": self.args.capacity, "measured": False}
        p = self.plan
        if self.args.upstream == "sim":
            costs = PRESETS[self.args.preset].scaled(self.args.sim_speed)
            costs = replace(costs, max_num_seqs=self.args.max_num_seqs)
            one = sim_capacity(costs, self.config, self.args.mix, p.seed)
            rate = one * self.args.servers
            print(f"capacity (simulated): {rate:.1f} requests/s ({one:.1f} per server)", flush=True)
            return {
                "rate_rps": round(rate, 3),
                "per_server_rps": round(one, 3),
                "measured": False,
                "method": f"the simulator's own model in virtual time: a closed loop of "
                f"{self.args.max_num_seqs} in flight per server (FCFS), completions from 15 s "
                f"to 75 s, times {self.args.servers} server(s)",
            }
        concurrency = self.args.max_num_seqs
        total = p.capacity_warmup_s + p.capacity_s
        print(f"measuring capacity: {concurrency} in flight for {total:g} s...", flush=True)
        trace = arrivals(1.0, self.mix, p.seed - 1)  # endless; the loop takes what it needs
        load_start = load_average()
        done = asyncio.run(
            run_closed(
                self.vllm_url + CHAT, trace, self.body_for("a", "[capacity] "), concurrency, total
            )
        )
        window = [r for t, r in done if p.capacity_warmup_s <= t < total]
        rate = len(window) / p.capacity_s
        print(f"capacity: {rate:.2f} requests/s ({len(window)} in {p.capacity_s:g} s)", flush=True)
        self.wait_vllm_idle()
        return {
            "rate_rps": round(rate, 3),
            "measured": True,
            "method": f"closed loop, {concurrency} in flight at vLLM alone (FCFS), completions "
            f"counted from {p.capacity_warmup_s:g} s to {total:g} s",
            "completed": len(window),
            "by_task": dict(Counter(r.task for r in window)),
            "errors": sum(r.outcome != "ok" for _, r in done),
            "loadavg_start": load_start,
            "loadavg_end": load_average(),
        }

    # -- one run -------------------------------------------------------------------

    def run(self, cfg: str, level: float, repeat: int, rate: float) -> None:
        p = self.plan
        seed = p.seed + repeat * 1000 + int(level * 100)
        trace = poisson_trace(rate, p.duration_s, self.mix, seed)
        prefix = f"[run {cfg}-{level:g}-{repeat}] "  # defeats the prefix cache across runs
        gateway, watch = None, None
        try:
            if cfg in ("c", "d"):
                gateway = gateway_server(
                    self.gateway_port,
                    ",".join(self.vllm_urls),
                    self.args.window,
                    self.logs / f"gateway-{cfg}-{level:g}-{repeat}.log",
                    self.args.tuned_tasks if cfg == "d" else None,
                    extra=self.args.gateway_extra,
                ).start()
                gateway.wait_ready("/ready", timeout_s=60)
                url = gateway.url + CHAT
                watch = GatewayWatch(gateway.url)
            else:
                url = self.vllm_url + CHAT
            urls = [url] if gateway else [u + CHAT for u in self.vllm_urls]
            sim0 = self.sim_counters()
            vllm_pids = self.vllm_pids()
            waited = self.wait_quiet(gateway)
            load_start = load_average()
            cpu0 = self._cpu_sample(vllm_pids, gateway)
            wall0 = time.monotonic()
            print(
                f"run {cfg} at {level:g}x ({rate:.2f}/s, {len(trace)} requests), "
                f"load avg {load_start[0]}...",
                flush=True,
            )
            with watch or contextlib.nullcontext():
                results = asyncio.run(run_trace(urls, trace, self.body_for(cfg, prefix), p.drain_s))
            wall = time.monotonic() - wall0
            cpu1 = self._cpu_sample(vllm_pids, gateway)
            sim1 = self.sim_counters()
        finally:
            if gateway is not None:
                gateway.stop()
        load_end = load_average()
        measured = [r for r in results if r.at >= p.warmup_s]
        streams = {name: load.stream for name, load in LOADS.items()}
        accounting = slo_report.accounting(results)
        classes = slo_report.class_stats(measured, self.config, streams, p.duration_s - p.warmup_s)
        run: dict[str, Any] = {
            "config": cfg,
            "level": level,
            "repeat": repeat,
            "rate_rps": round(rate, 3),
            "seed": seed,
            "arrivals": len(trace),
            "measured": len(measured),
            "window_s": p.duration_s - p.warmup_s,
            "wall_s": round(wall, 1),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "max_lag_s": round(max((r.lag for r in results), default=0.0), 4),
            "waited_for_quiet_s": round(waited, 1),
            "cpu": {
                "loadgen_s": round(cpu1["loadgen"] - cpu0["loadgen"], 2),
                "loadgen_pct": round(100 * (cpu1["loadgen"] - cpu0["loadgen"]) / wall, 1),
                "gateway_s": round(cpu1["gateway"] - cpu0["gateway"], 2) if gateway else None,
                "gateway_pct": (
                    round(100 * (cpu1["gateway"] - cpu0["gateway"]) / wall, 1) if gateway else None
                ),
                "others_cores": (round(others_cpu(cpu0, cpu1) / wall, 2) if vllm_pids else None),
                "vllm_s": round(cpu1["vllm"] - cpu0["vllm"], 1) if vllm_pids else None,
                "vllm_pct": (
                    round(100 * (cpu1["vllm"] - cpu0["vllm"]) / wall, 1) if vllm_pids else None
                ),
            },
            "gateway": watch.summary(wall) if watch is not None else None,
            "tokens": {
                "completion": sum(r.completion_tokens or 0 for r in results),
                "streamed": sum(r.completion_tokens or 0 for r in results if LOADS[r.task].stream),
                "ok": sum(r.outcome == "ok" for r in results),
            },
            "sim": {k: round(sim1[k] - sim0.get(k, 0.0), 3) for k in sim1} if sim1 else None,
            "accounting": accounting,
            "accounting_measured": slo_report.accounting(measured),
            "classes": classes,
        }
        self.runs.append(run)
        for r in results:
            self.requests.append({"config": cfg, "level": level, "repeat": repeat, **asdict(r)})
        rt = classes.get("realtime", {}).get("attainment")
        print(
            f"  done in {wall:.0f} s: ok {accounting['ok']}, error {accounting['error']}, "
            f"lost {accounting['lost']}, cutoff {accounting['cutoff']}; "
            f"realtime attainment {rt}; load avg {load_end[0]}",
            flush=True,
        )
        self.wait_vllm_idle()

    @property
    def gateway_port(self) -> int:
        port: int = self.args.port
        return port + (self.args.servers if self.args.upstream == "sim" else 1)

    def sim_counters(self) -> dict[str, float]:
        """The simulators' own counters, summed: steps run late, time lost (see sim_vllm)."""
        if self.args.upstream != "sim":
            return {}
        totals: dict[str, float] = {}
        for url in self.vllm_urls:
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("sim_"):
                    name = line.split("{", 1)[0]
                    totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals

    def results_by_run(self) -> dict[tuple[str, float, int], list[Result]]:
        by_run: dict[tuple[str, float, int], list[Result]] = {}
        names = {f.name for f in dataclasses.fields(Result)}
        for row in self.requests:
            key = (row["config"], float(row["level"]), int(row["repeat"]))
            by_run.setdefault(key, []).append(Result(**{k: row[k] for k in names}))
        return by_run

    def wait_quiet(self, gateway: Server | None) -> float:
        """Wait (up to --quiet-wait s) until other people's processes leave the CPUs alone.

        "Others" is the machine's busy time minus this benchmark's processes (vLLM's group,
        the gateway, the load generator), sampled over 5 s. Returns the seconds waited.
        ``--quiet-wait 0`` skips the check (others' CPU is still recorded per run).
        """
        if self.args.quiet_wait <= 0:
            return 0.0
        started = time.monotonic()
        pids = self.vllm_pids()
        while True:
            before = self._cpu_sample(pids, gateway)
            time.sleep(5)
            others = others_cpu(before, self._cpu_sample(pids, gateway)) / 5
            waited = time.monotonic() - started
            if others <= self.args.quiet_cores or waited >= self.args.quiet_wait:
                if others > self.args.quiet_cores:
                    print(f"  other processes still use {others:.1f} cores; going on", flush=True)
                return waited
            print(f"  other processes use {others:.1f} cores; waiting...", flush=True)

    def _cpu_sample(self, pids: Sequence[int], gateway: Server | None) -> dict[str, float]:
        return {
            "machine": machine_busy_seconds(),
            "loadgen": cpu_seconds_self(),
            "gateway": cpu_seconds(gateway.pid) if gateway else 0.0,
            "vllm": self.vllm_cpu(pids),
        }

    def remaining_s(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def expected_run_s(self, level: float) -> float:
        """A pessimistic guess of one run's wall time, to stay inside the budget."""
        p = self.plan
        backlog = p.duration_s * max(level - 1.0, 0.0)
        return p.duration_s + min(p.drain_s, backlog + 20) + 5


class GatewayWatch:
    """Reads the gateway's /metrics once a second during a run (a thread, off the load
    generator's loop): the window the controller chose, preemptions, resumed tokens."""

    WANTED = ("gateway_window_size{", "gateway_preemptions_total{", "gateway_resumed_tokens_total{")

    def __init__(self, url: str) -> None:
        self._url = url + "/metrics"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gateway-watch", daemon=True)
        self.windows: list[float] = []
        self.last: dict[str, float] = {}

    def __enter__(self) -> GatewayWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._read()  # the counters' final values

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            if self._read():
                self.windows.append(self.last["gateway_window_size{"])

    def _read(self) -> bool:
        try:
            with urllib.request.urlopen(self._url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return False
        totals = dict.fromkeys(self.WANTED, 0.0)
        for line in text.splitlines():
            for name in self.WANTED:
                if line.startswith(name):
                    totals[name] += float(line.rsplit(" ", 1)[1])
        self.last = totals
        return True

    def summary(self, wall_s: float) -> dict[str, Any]:
        ordered = sorted(self.windows)
        preemptions = self.last.get("gateway_preemptions_total{", 0.0)
        return {
            "window": {
                "min": ordered[0] if ordered else None,
                "median": ordered[len(ordered) // 2] if ordered else None,
                "max": ordered[-1] if ordered else None,
                "last": self.windows[-1] if self.windows else None,
            },
            "preemptions": int(preemptions),
            "preemptions_per_min": round(60 * preemptions / wall_s, 2) if wall_s > 0 else None,
            "resumed_tokens": int(self.last.get("gateway_resumed_tokens_total{", 0.0)),
        }


def _wait_health(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def others_cpu(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds used between two samples by processes that are not the benchmark's."""
    ours = sum(after[k] - before[k] for k in ("loadgen", "gateway", "vllm"))
    return max(after["machine"] - before["machine"] - ours, 0.0)


def cpu_seconds_self() -> float:
    return cpu_seconds(os.getpid())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short version: 2 levels, 30 s runs")
    p.add_argument("--repeats", type=int, help="runs per (level, configuration) [1]")
    p.add_argument("--levels", help="comma-separated multiples of capacity [0.5,1,1.5,2]")
    p.add_argument("--configs", help="which of a,b,c,d to run [a,b,c]")
    p.add_argument(
        "--tuned-tasks",
        type=Path,
        default=ROOT / "loadtest" / "tasks-tuned.toml",
        help="configuration d: the gateway with this task table (an experiment)",
    )
    p.add_argument("--duration", type=float, help="seconds of arrivals per run [60]")
    p.add_argument("--warmup", type=float, help="seconds at the start of a run not measured [10]")
    p.add_argument("--drain", type=float, help="seconds after the last arrival to wait [60]")
    p.add_argument("--budget-min", type=float, help="start no run that would end after [30]")
    p.add_argument("--capacity", type=float, help="skip measuring; use this many requests/s")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"task weights [{DEFAULT_MIX}]")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder [{DEFAULT_MODEL}]")
    p.add_argument("--max-num-seqs", type=int, help="vLLM's --max-num-seqs [8; sim: the preset's]")
    p.add_argument("--window", type=int, help="the gateway's --window [= max-num-seqs]")
    p.add_argument(
        "--gateway-extra", default="", help="extra gateway flags, e.g. '--window-mode fixed'"
    )
    p.add_argument("--port", type=int, default=19210, help="vLLM's port; the gateway's is +1")
    p.add_argument(
        "--kv-cache-gib",
        type=int,
        default=1,
        help="VLLM_CPU_KVCACHE_SPACE [1: ~87k tokens, far more than 8 requests need]",
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each run, wait until other processes use at most this many cores [0.3]",
    )
    p.add_argument("--quiet-wait", type=float, default=120, help="...but at most this long [120]")
    p.add_argument("--vllm-url", help="use this running vLLM instead of starting one")
    p.add_argument(
        "--upstream",
        choices=("vllm", "sim"),
        default="vllm",
        help="vllm: the real CPU vLLM; sim: SIMULATED vLLMs (loadtest/sim_vllm.py) [vllm]",
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="h100-7b", help="the simulator's [h100-7b]"
    )
    p.add_argument("--servers", type=int, default=1, help="simulated vLLMs behind one gateway [1]")
    p.add_argument("--sim-speed", type=float, default=1.0, help="simulated engine speed [1.0]")
    p.add_argument("--vllm-extra", default="", help="extra vLLM flags, e.g. --enforce-eager")
    p.add_argument(
        "--omp-bind",
        default="nobind",
        help="VLLM_CPU_OMP_THREADS_BIND for vLLM's worker [nobind: let the kernel place it; "
        "vLLM's default 'auto' pins every vLLM on the machine to core 0, so other people's "
        "idle test servers would share our worker's core]",
    )
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results")
    p.add_argument("--logs", type=Path, default=ROOT / "test-output" / "slo")
    p.add_argument(
        "--replot", type=Path, help="recompute slo.json, slo.md and the PNGs from a saved run"
    )
    p.add_argument(
        "--note", action="append", default=[], help="a remark for the report (repeatable)"
    )
    args = p.parse_args(argv)
    sim = args.upstream == "sim"
    if args.max_num_seqs is None:
        args.max_num_seqs = PRESETS[args.preset].max_num_seqs if sim else 8
    args.window = args.window or args.max_num_seqs
    args.vllm_extra = shlex.split(args.vllm_extra)
    args.gateway_extra = shlex.split(args.gateway_extra)
    if sim:
        if args.port == 19210:  # the default: the simulators live in 19700-19799
            args.port = 19710
        if not (args.port >= 19700 and args.port + args.servers <= 19799):
            p.error("with --upstream sim, ports port .. port+servers must be in 19700-19799")
        if args.out == ROOT / "loadtest" / "results":
            args.out = ROOT / "loadtest" / "results" / "sim"
    elif not 19200 <= args.port <= 19298:
        p.error("--port must be in 19200-19298 (the gateway takes port + 1)")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else SIM if args.upstream == "sim" else FULL
    changes: dict[str, Any] = {}
    if args.levels:
        changes["levels"] = tuple(float(x) for x in args.levels.split(","))
    if args.configs:
        changes["configs"] = tuple(c.strip() for c in args.configs.split(","))
        if not set(changes["configs"]) <= {"a", "b", "c", "d"}:
            raise SystemExit("--configs takes a, b, c and/or d")
    for name, attr in (("repeats", "repeats"), ("duration", "duration_s")):
        if getattr(args, name) is not None:
            changes[attr] = getattr(args, name)
    for name, attr in (("warmup", "warmup_s"), ("drain", "drain_s")):
        if getattr(args, name) is not None:
            changes[attr] = getattr(args, name)
    if args.budget_min is not None:
        changes["budget_s"] = args.budget_min * 60
    return replace(plan, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # A plain SIGTERM would skip the finally that stops vLLM's process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.replot:
        return replot(args.replot, args.out, args.note)
    plan = make_plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    bench = Bench(args, plan)
    machine = describe_machine()
    skipped: list[dict[str, Any]] = []
    capacity: dict[str, Any] = {"rate_rps": 0.0, "measured": False}
    aborted: str | None = None
    try:
        bench.start_vllm()
        bench.warm_up()
        capacity = bench.measure_capacity()
        for repeat, level in itertools.product(range(plan.repeats), plan.levels):
            for cfg in plan.configs:
                if bench.remaining_s() < bench.expected_run_s(level):
                    print(f"skipping {cfg} at {level:g}x: out of time budget", flush=True)
                    skipped.append({"config": cfg, "level": level, "repeat": repeat})
                    continue
                bench.run(cfg, level, repeat, level * capacity["rate_rps"])
    except Exception as exc:  # keep what was measured; say why the rest is missing
        aborted = f"{type(exc).__name__}: {exc}"
        print(f"benchmark aborted: {aborted}", flush=True)
    finally:
        bench.stop()
    finished = datetime.now(UTC)
    report = build_report(args, plan, bench, machine, capacity, started, finished, skipped)
    report["aborted"] = aborted
    report["notes"] = list(args.note)
    write_outputs(report, bench, args.out)
    print(f"wrote {args.out}/slo.json, slo.md, slo-requests.csv and the plots", flush=True)
    for t in report["targets"]:
        print(f"  {t['target']}: {t['measured']} (goal {t['goal']}; met: {t['met']})")
    return 1 if aborted else 0


def build_report(
    args: argparse.Namespace,
    plan: Plan,
    bench: Bench,
    machine: Any,
    capacity: dict[str, Any],
    started: datetime,
    finished: datetime,
    skipped: list[dict[str, Any]],
) -> dict[str, Any]:
    summary = slo_report.summarize(bench.runs)
    config = bench.config
    shapes = {
        task: (
            f"({config.tasks[task].priority_class}, "
            f"{'streamed' if LOADS[task].stream else 'not streamed'}, max_tokens "
            f"{LOADS[task].max_tokens or config.tasks[task].max_tokens})"
        )
        for task in bench.mix
    }
    return {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "wall_min": (finished - started).total_seconds() / 60,
        "command": (
            "python loadtest/slo.py " + " ".join(bench.argv)
            if args.upstream == "sim"
            else "./launch/bench.sh slo " + " ".join(sys.argv[1:])
        ),
        "machine": asdict(machine),
        "source": bench.source,
        "machine_text": machine.markdown(),
        "settings": {
            **{k: v for k, v in asdict(plan).items()},
            "mix": args.mix,
            "shapes": shapes,
            "model": (
                f"SIMULATED vLLM, preset {args.preset} x {args.servers} server(s) "
                f"(loadtest/sim_vllm.py; no model runs)"
                if args.upstream == "sim"
                else args.model
                if not args.vllm_url
                else f"{bench.model_id} (at {args.vllm_url})"
            ),
            "upstream": args.upstream,
            "servers": args.servers,
            "preset": args.preset if args.upstream == "sim" else None,
            "max_num_seqs": args.max_num_seqs,
            "window": args.window,
            "vllm_extra": args.vllm_extra,
            "kv_cache_gib": args.kv_cache_gib,
            "omp_bind": args.omp_bind,
            "tuned_tasks": (
                str(args.tuned_tasks.relative_to(ROOT))
                if "d" in plan.configs and args.tuned_tasks.is_relative_to(ROOT)
                else str(args.tuned_tasks)
                if "d" in plan.configs
                else None
            ),
            "sla": {
                t: {
                    "latency_s": config.tasks[t].sla_latency_s,
                    "ttft_s": config.tasks[t].sla_ttft_s,
                }
                for t in bench.mix
            },
        },
        "capacity": capacity,
        "skipped": skipped,
        "runs": bench.runs,
        "summary": summary,
        "targets": slo_report.check_targets(summary, bench.runs, config),
        "admission": admission_report(bench.results_by_run(), config, plan.warmup_s),
    }


def admission_report(
    by_run: dict[tuple[str, float, int], list[Result]], config: Config, warmup_s: float
) -> list[dict[str, Any]]:
    """Refusals and misses of each gateway run (c) against vLLM's (b) on the same trace."""
    streams = {name: load.stream for name, load in LOADS.items()}
    out = []
    for (cfg, level, repeat), results in sorted(by_run.items()):
        twin = by_run.get(("b", level, repeat))
        if cfg != "c" or twin is None:
            continue
        measured = [r for r in results if r.at >= warmup_s]
        twin_measured = [r for r in twin if r.at >= warmup_s]
        classes = slo_report.admission(measured, twin_measured, config, streams)
        out.append({"level": level, "repeat": repeat, "classes": classes})
    return out


def write_outputs(report: dict[str, Any], bench: Bench, out: Path) -> None:
    (out / "slo.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "slo.md").write_text(slo_report.markdown(report))
    if bench.requests:
        with (out / "slo-requests.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(bench.requests[0]))
            writer.writeheader()
            for row in bench.requests:
                writer.writerow(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                )
    if bench.runs:
        slo_report.plot(report, bench.config, out)


def replot(path: Path, out: Path, notes: Sequence[str]) -> int:
    """Recompute the statistics from a saved run (slo.json and slo-requests.csv beside it)
    with the current definitions; rewrite slo.json, slo.md and the plots. No servers, no load.
    """
    report = json.loads(path.read_text())
    config = load_config()
    requests_csv = path.with_name("slo-requests.csv")
    if requests_csv.exists():
        by_run = read_requests(requests_csv)
        rederive(report, by_run, config)
        report["admission"] = admission_report(by_run, config, report["settings"]["warmup_s"])
    report["summary"] = slo_report.summarize(report["runs"])
    report["targets"] = slo_report.check_targets(report["summary"], report["runs"], config)
    report["notes"] = [*report.get("notes", []), *notes]
    out.mkdir(parents=True, exist_ok=True)
    (out / "slo.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "slo.md").write_text(slo_report.markdown(report))
    slo_report.plot(report, config, out)
    print(f"rewrote {out}/slo.json, slo.md and the plots from {path}")
    return 0


def read_requests(requests_csv: Path) -> dict[tuple[str, float, int], list[Result]]:
    """The one-line-per-request CSV, by run."""
    fields = {f.name: f.type for f in dataclasses.fields(Result)}
    by_run: dict[tuple[str, float, int], list[Result]] = {}
    with requests_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            values: dict[str, Any] = {}
            for name in fields:
                raw = row[name]
                if raw == "":
                    values[name] = None
                elif name in ("index", "status", "completion_tokens"):
                    values[name] = int(raw)
                elif name in ("task", "outcome", "reason"):
                    values[name] = raw
                elif name == "degraded":
                    values[name] = raw == "True"
                else:
                    values[name] = float(raw)
            key = (row["config"], float(row["level"]), int(row["repeat"]))
            by_run.setdefault(key, []).append(Result(**values))
    return by_run


def rederive(
    report: dict[str, Any], by_run: dict[tuple[str, float, int], list[Result]], config: Config
) -> None:
    """Per-run class statistics again, from the requests."""
    warmup = report["settings"]["warmup_s"]
    window = report["settings"]["duration_s"] - warmup
    streams = {name: load.stream for name, load in LOADS.items()}
    for run in report["runs"]:
        results = by_run[(run["config"], float(run["level"]), int(run["repeat"]))]
        measured = [r for r in results if r.at >= warmup]
        run["accounting"] = slo_report.accounting(results)
        run["accounting_measured"] = slo_report.accounting(measured)
        run["classes"] = slo_report.class_stats(measured, config, streams, window)


if __name__ == "__main__":
    sys.exit(main())

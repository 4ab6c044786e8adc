"""Check (and fit) the simulated vLLM against the committed real CPU SLO runs.

SIMULATION vs MEASUREMENT. Each committed run of configuration a (vLLM alone, FCFS) or b
(vLLM alone, static priority) is replayed through the batching model (``sim_engine``) in
virtual time: the same trace (``workload.poisson_trace`` with the run's rate and seed), the
same bodies (``workload.vllm_body``: system prompts, max_tokens, priorities), the same
cut-off (arrivals + drain), and the statistics of ``slo_report.class_stats``. Then the
simulated per-class latency, TTFT, attainment and goodput are set against the measured ones.

    python loadtest/sim_calibrate.py                 # check the cpu preset, write the report
    python loadtest/sim_calibrate.py --fit           # grid-search the cpu preset first

No servers and no HTTP: the replay checks the model of vLLM, not this machine's network
stack (the real runs' requests also took a few ms through HTTP, which is below the error).

Fitting uses only the ``slo-v6`` b runs (2026-12-03, capacity 1.38/s) and the capacity they
were measured at; the other runs are held out: ``slo-v2`` and ``slo-adaptive`` (b, the same
day, the same capacity) and the version-1 run (``slo.json``, a and b, 2026-11-21, when the
machine measured 2.18/s: the model is sped up to that capacity by one factor, nothing else).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.config import Config, load_config  # noqa: E402
from loadtest import slo_report  # noqa: E402
from loadtest.openloop import Result  # noqa: E402
from loadtest.sim_engine import (  # noqa: E402
    PRESETS,
    Costs,
    Engine,
    Seq,
    answer_length,
    prompt_tokens,
    replay,
)
from loadtest.workload import (  # noqa: E402
    LOADS,
    Arrival,
    arrivals,
    client_body,
    parse_mix,
    poisson_trace,
    vllm_body,
)

RESULTS = ROOT / "loadtest" / "results"
#: (name, path, used for fitting)
SOURCES = (
    ("slo-v6", RESULTS / "slo-v6" / "slo.json", True),
    ("slo-v2", RESULTS / "slo-v2" / "slo.json", False),
    ("slo-adaptive", RESULTS / "slo-adaptive" / "slo.json", False),
    ("slo-v1", RESULTS / "slo.json", False),
)
CLASSES = ("realtime", "interactive", "standard", "batch")


def to_seq(body: Mapping[str, Any], index: int, policy_priority: bool) -> Seq:
    max_tokens = int(body["max_tokens"])
    return Seq(
        id=index,
        priority=int(body.get("priority", 0)) if policy_priority else 0,
        arrival=0.0,
        prompt_tokens=prompt_tokens(body),
        target=answer_length(body, max_tokens),
    )


def body_for(config: Config, arrival: Arrival, cfg: str, level: float, repeat: int) -> Any:
    prefix = f"[run {cfg}-{level:g}-{repeat}] "
    client = client_body(LOADS[arrival.task], arrival.prompt, arrival.seed, prefix)
    return vllm_body(config, client, "model", "fcfs" if cfg == "a" else "class")


def simulate_run(
    costs: Costs, config: Config, run: Mapping[str, Any], settings: Mapping[str, Any]
) -> tuple[dict[str, Any], list[Result]]:
    """The run's trace through the model; (class stats, results) as slo.py computes them."""
    mix = parse_mix(settings["mix"])
    duration, warmup, drain = settings["duration_s"], settings["warmup_s"], settings["drain_s"]
    trace = poisson_trace(run["rate_rps"], duration, mix, run["seed"])
    engine = Engine(costs, "priority")  # a sends everyone priority 0: FCFS on this policy
    timed = [
        (a.at, to_seq(body_for(config, a, run["config"], run["level"], run["repeat"]), i, True))
        for i, a in enumerate(trace)
    ]
    until = (trace[-1].at if trace else 0.0) + drain
    tracked = replay(engine, timed, until=until)
    results = []
    for i, a in enumerate(trace):
        t = tracked[i]
        r = Result(a.index, a.task, a.at)
        if t.end is not None and t.end <= until:
            r.outcome, r.latency, r.elapsed = "ok", t.end - a.at, t.end - a.at
            r.completion_tokens = t.tokens
        else:
            r.elapsed = until - a.at
        if t.first is not None and t.first <= until:
            r.ttft = t.first - a.at
        results.append(r)
    measured = [r for r in results if r.at >= warmup]
    streams = {name: load.stream for name, load in LOADS.items()}
    return slo_report.class_stats(measured, config, streams, duration - warmup), results


def capacity(
    costs: Costs, config: Config, mix_text: str, seed: int, concurrency: int | None = None
) -> float:
    """slo.py's capacity measurement in virtual time: ``max_num_seqs`` in flight for 75 s,
    FCFS, completions from 15 s to 75 s per second."""
    mix = parse_mix(mix_text)
    source: Iterator[Arrival] = arrivals(1.0, mix, seed - 1)
    engine = Engine(costs, "priority")
    now, done = 0.0, 0
    for _ in range(concurrency or costs.max_num_seqs):
        a = next(source)
        engine.add(to_seq(body_for(config, a, "a", 0, 0), a.index, False))
    while now < 75.0:
        result = engine.step()
        now += max(result.duration, 1e-6)
        for e in result.emitted:
            if e.finished:
                if now >= 15.0:
                    done += 1
                a = next(source)
                engine.add(to_seq(body_for(config, a, "a", 0, 0), a.index, False))
    return done / 60.0


def load_runs(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    report = json.loads(path.read_text())
    runs = [r for r in report["runs"] if r["config"] in ("a", "b")]
    return report, runs


def compare(real: Mapping[str, Any], sim: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pclass in CLASSES:
        r, s = real.get(pclass), sim.get(pclass)
        if r is None or s is None:
            continue
        row: dict[str, Any] = {"class": pclass, "n": r["n"]}
        for key in ("latency_s", "ttft_s"):
            for q in ("p50", "p95"):
                row[f"{key}_{q}"] = (r[key][q], s[key][q])
        row["attainment"] = (r["attainment"], s["attainment"])
        row["goodput_rps"] = (r["goodput_rps"], s["goodput_rps"])
        rows.append(row)
    return rows


def log_error(pair: tuple[float | None, float | None]) -> float | None:
    """|ln(sim / real)|: 0.1 is 10% off either way. None when either side is missing."""
    real, sim = pair
    if real is None or sim is None or real <= 0 or sim <= 0:
        return None
    return abs(math.log(sim / real))


def score(rows: Sequence[Mapping[str, Any]]) -> float:
    errors = [
        e
        for row in rows
        for key in ("latency_s_p50", "latency_s_p95", "ttft_s_p50", "ttft_s_p95")
        if (e := log_error(row[key])) is not None
    ]
    attainment = [
        abs(real - sim)
        for row in rows
        if (real := row["attainment"][0]) is not None and (sim := row["attainment"][1]) is not None
    ]
    return float(sum(errors) / max(len(errors), 1) + sum(attainment) / max(len(attainment), 1))


def check(costs: Costs, config: Config, fit_only: bool = False) -> dict[str, Any]:
    """Every run of every source through ``costs``; per-source speed for other capacities."""
    out: dict[str, Any] = {"sources": []}
    base_capacity: float | None = None
    for name, path, for_fit in SOURCES:
        if fit_only and not for_fit:
            continue
        if not path.exists():
            continue
        report, runs = load_runs(path)
        settings = report["settings"]
        real_capacity = float(report["capacity"]["rate_rps"])
        if base_capacity is None:
            base_capacity = capacity(costs, config, settings["mix"], settings["seed"])
        speed = real_capacity / 1.38 if abs(real_capacity - 1.38) > 0.05 else 1.0
        scaled = costs.scaled(speed) if speed != 1.0 else costs
        source: dict[str, Any] = {
            "name": name,
            "path": str(path.relative_to(ROOT)),
            "used_for_fit": for_fit,
            "real_capacity_rps": real_capacity,
            "speed_factor": round(speed, 3),
            "runs": [],
        }
        for run in runs:
            stats, _ = simulate_run(scaled, config, run, settings)
            rows = compare(run["classes"], stats)
            source["runs"].append(
                {"config": run["config"], "level": run["level"], "rows": rows, "score": score(rows)}
            )
        out["sources"].append(source)
    out["sim_capacity_rps"] = round(base_capacity or 0.0, 3)
    return out


def fit(config: Config) -> tuple[Costs, float]:
    """Grid search of the cpu preset's three costs on the fitting runs: a coarse grid, then
    a finer one around its best point."""
    coarse = (
        (0.02, 0.04, 0.06, 0.08, 0.10, 0.12),
        (0.0, 0.004, 0.008, 0.012, 0.016, 0.02),
        (0.0005, 0.001, 0.002, 0.004, 0.008),
    )
    costs, _ = _search(config, PRESETS["cpu"], coarse)
    b, s, f = costs.base_s, costs.per_seq_s, costs.per_prefill_token_s
    fine = (
        (b - 0.01, b - 0.005, b, b + 0.005, b + 0.01),
        tuple(x for x in (s - 0.002, s, s + 0.002, s + 0.004) if x >= 0),
        (f * 0.75, f, f * 1.25, f * 1.5),
    )
    return _search(config, costs, fine)


def _search(config: Config, start: Costs, axes: tuple[Sequence[float], ...]) -> tuple[Costs, float]:
    best: tuple[float, Costs] | None = None
    for base_s, per_seq, per_prefill in itertools.product(*axes):
        costs = replace(start, base_s=base_s, per_seq_s=per_seq, per_prefill_token_s=per_prefill)
        result = check(costs, config, fit_only=True)
        runs = result["sources"][0]["runs"]
        cap_error = abs(math.log(max(result["sim_capacity_rps"], 1e-6) / 1.38))
        total = sum(r["score"] for r in runs) / len(runs) + 2 * cap_error
        if best is None or total < best[0]:
            best = (total, costs)
            print(f"  {total:.3f}: {base_s:g} {per_seq:g} {per_prefill:g}", flush=True)
    assert best is not None
    return best[1], best[0]


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Median |error| per quantity, over the held-out and the fitted runs separately."""
    out: dict[str, Any] = {}
    for group, wanted in (("fitted", True), ("held_out", False)):
        errs: dict[str, list[float]] = {}
        for source in result["sources"]:
            if source["used_for_fit"] != wanted:
                continue
            for run in source["runs"]:
                for row in run["rows"]:
                    for key in ("latency_s_p50", "latency_s_p95", "ttft_s_p50", "ttft_s_p95"):
                        e = log_error(row[key])
                        if e is not None:
                            errs.setdefault(key, []).append(math.exp(e) - 1)
                    for key in ("attainment", "goodput_rps"):
                        real, sim = row[key]
                        if real is not None and sim is not None:
                            errs.setdefault(key, []).append(abs(real - sim))
        out[group] = {
            key: {
                "median": round(slo_report.percentile(v, 50) or 0.0, 3),
                "p90": round(slo_report.percentile(v, 90) or 0.0, 3),
                "n": len(v),
            }
            for key, v in errs.items()
        }
    return out


def markdown(result: Mapping[str, Any], costs: Costs) -> str:
    lines = [
        "# The simulated vLLM against the real CPU runs (preset `cpu`)",
        "",
        "SIMULATION vs MEASUREMENT: each committed run of configuration a (FCFS) or b (static "
        "priority) replayed through `loadtest/sim_engine.py` in virtual time "
        "(`python loadtest/sim_calibrate.py`). Real / simulated per cell.",
        "",
        f"Preset: base {costs.base_s * 1000:g} ms, per running request "
        f"{costs.per_seq_s * 1000:g} ms, per prompt token {costs.per_prefill_token_s * 1000:g}"
        f" ms, max_num_seqs {costs.max_num_seqs}. Simulated capacity (slo.py's closed loop of "
        f"8, virtual time): **{result['sim_capacity_rps']} req/s** (measured: 1.38).",
        "",
        "## Errors",
        "",
        "Latency and TTFT: median and p90 over (run, class) cells of |sim / real - 1|. "
        "Attainment and goodput: absolute differences.",
        "",
        "| runs | quantity | median error | p90 error | cells |",
        "|---|---|---|---|---|",
    ]
    for group, rows in result["summary"].items():
        for key, v in rows.items():
            pct = key not in ("attainment", "goodput_rps")
            med = f"{v['median']:.0%}" if pct else f"{v['median']:.3f}"
            p90 = f"{v['p90']:.0%}" if pct else f"{v['p90']:.3f}"
            lines.append(f"| {group} | {key} | {med} | {p90} | {v['n']} |")
    lines += [
        "",
        "## Per run and class",
        "",
        "| source | config | load | class | n | latency p50 | latency p95 | TTFT p50 | TTFT p95 "
        "| attainment | goodput/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(p: tuple[Any, Any], digits: int = 2) -> str:
        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.{digits}f}"

        return f"{f(p[0])} / {f(p[1])}"

    for source in result["sources"]:
        tag = source["name"] + (" (fit)" if source["used_for_fit"] else "")
        if source["speed_factor"] != 1.0:
            tag += f" (x{source['speed_factor']})"
        for run in source["runs"]:
            for row in run["rows"]:
                lines.append(
                    f"| {tag} | {run['config']} | {run['level']:g}x | {row['class']} "
                    f"| {row['n']} | {pair(row['latency_s_p50'])} | {pair(row['latency_s_p95'])} "
                    f"| {pair(row['ttft_s_p50'])} | {pair(row['ttft_s_p95'])} "
                    f"| {pair(row['attainment'])} | {pair(row['goodput_rps'])} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fit", action="store_true", help="grid-search the cpu preset first")
    p.add_argument("--out", type=Path, default=RESULTS / "sim")
    args = p.parse_args(argv)
    config = load_config()
    costs = PRESETS["cpu"]
    if args.fit:
        costs, total = fit(config)
        print(f"best: {costs} (score {total:.3f})")
    result = check(costs, config)
    result["summary"] = summary(result)
    result["costs"] = {k: getattr(costs, k) for k in costs.__dataclass_fields__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "calibration.md").write_text(markdown(result, costs))
    print(json.dumps(result["summary"], indent=1))
    print(f"simulated capacity {result['sim_capacity_rps']} req/s; wrote {args.out}/calibration.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())

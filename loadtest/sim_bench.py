"""The SLO benchmark at GPU scale, against SIMULATED vLLMs: ``./launch/bench.sh sim``.

SIMULATION. No GPU and no model: the upstreams are ``loadtest/sim_vllm.py`` processes whose
tokens are timed by a model of vLLM's continuous batching calibrated to Qwen2.5-7B-Instruct
on one H100 (preset ``h100-7b``; sources in ``loadtest/README-sim.md``). The gateway, the load
generator and the simulators are real processes sharing this machine's CPU, so what is
measured for real is the gateway's own cost and where it runs out of CPU.

What one command does (about 11 minutes on 2 cores):

1. The cpu preset against the committed real CPU runs (``sim_calibrate.py``: virtual time,
   seconds): the simulator's error, into ``loadtest/results/sim/calibration.md``.
2. ``slo.py --upstream sim`` with 1 simulated H100, then with 4 behind one gateway:
   configurations a (FCFS), b (static priority) and c (the gateway, shipped defaults, window =
   max_num_seqs per upstream) at 0.5x-2x of the simulated capacity, 15 s of arrivals each.
3. The gateway alone at light load (c at 0.25x of one server), for its CPU per request.
4. ``summary.md`` / ``summary.json``: goodput per configuration, the gateway's CPU per request
   and per streamed token, the arrival rate at which it would fill one core, and from that
   how many simulated H100s one gateway process can front; ``gateway_cpu.png``.

    ./launch/bench.sh sim [--servers 1,4] [--levels 0.5,1,1.5,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest import sim_calibrate, slo  # noqa: E402

OUT = ROOT / "loadtest" / "results" / "sim"


def gateway_costs(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per gateway run (c): its CPU per completed request and per streamed token delivered,
    and the arrival rate at which it would use a whole core at that cost. A run in which
    fewer than 95% of the requests were answered (refused, cut off, lost) says little about
    the cost per request: it is marked ``served_all = False`` and left out of the medians."""
    rows = []
    for run in runs:
        if run["config"] != "c" or run["cpu"]["gateway_s"] is None:
            continue
        cpu_s = run["cpu"]["gateway_s"]
        wall = run["wall_s"]
        requests = run["arrivals"]
        ok = run["tokens"]["ok"]
        streamed = run["tokens"]["streamed"]
        per_request = cpu_s / ok if ok else None
        rows.append(
            {
                "level": run["level"],
                "rate_rps": run["rate_rps"],
                "requests": requests,
                "ok": ok,
                "served_all": ok >= 0.95 * requests,
                "streamed_tokens": streamed,
                "gateway_cpu_s": cpu_s,
                "gateway_cores": round(cpu_s / wall, 3) if wall else None,
                "cpu_per_request_ms": round(1000 * per_request, 3) if per_request else None,
                "cpu_per_streamed_token_us": round(1e6 * cpu_s / streamed, 1) if streamed else None,
                "tokens_per_request": round(run["tokens"]["completion"] / max(ok, 1), 1),
                "one_core_at_rps": round(1 / per_request, 1) if per_request else None,
                "others_cores": run["cpu"]["others_cores"],
                "loadgen_max_lag_s": run["max_lag_s"],
                "sim_lost_s": (run.get("sim") or {}).get("sim_lost_seconds_total"),
            }
        )
    return rows


def goodput_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per level: each configuration's total goodput, realtime attainment, chat TTFT p95."""
    table: dict[float, dict[str, Any]] = {}
    for run in report["runs"]:
        row = table.setdefault(run["level"], {"level": run["level"], "rate_rps": run["rate_rps"]})
        classes = run["classes"]
        row[run["config"]] = {
            "goodput_rps": round(sum(c["goodput_rps"] or 0 for c in classes.values()), 2),
            "realtime_attainment": classes.get("realtime", {}).get("attainment"),
            "interactive_ttft_p95_s": classes.get("interactive", {}).get("ttft_s", {}).get("p95"),
            "errors": run["accounting"]["error"],
            "cutoff": run["accounting"]["cutoff"],
            "others_cores": run["cpu"]["others_cores"],
            "sim_lost_s": (run.get("sim") or {}).get("sim_lost_seconds_total"),
            "loadgen_max_lag_s": run["max_lag_s"],
        }
    return [table[k] for k in sorted(table)]


def _most(row: Mapping[str, Any], key: str) -> float | None:
    values = [v[key] for c, v in row.items() if c in ("a", "b", "c") and v.get(key) is not None]
    return max(values) if values else None


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def summarize(
    reports: Mapping[int, Mapping[str, Any]],
    calibration: Mapping[str, Any],
    cost: Mapping[str, Any],
) -> dict[str, Any]:
    per_server = next(iter(reports.values()))["capacity"].get("per_server_rps")
    light = gateway_costs(cost["runs"])
    costs = [
        row
        for r in [*reports.values(), cost]
        for row in gateway_costs(r["runs"])
        if row["served_all"]
    ]
    per_request = median([r["cpu_per_request_ms"] for r in costs if r["cpu_per_request_ms"]])
    per_token = median(
        [r["cpu_per_streamed_token_us"] for r in costs if r["cpu_per_streamed_token_us"]]
    )
    one_core = 1000 / per_request if per_request else None
    return {
        "per_server_capacity_rps": per_server,
        "servers": {
            str(n): {
                "capacity_rps": r["capacity"]["rate_rps"],
                "goodput": goodput_table(r),
                "gateway": gateway_costs(r["runs"]),
            }
            for n, r in reports.items()
        },
        "gateway_cpu_per_request_ms_median": per_request,
        "gateway_cpu_per_streamed_token_us_median": per_token,
        "gateway_one_core_at_rps": round(one_core, 1) if one_core else None,
        "cost_runs": len(costs),
        "light_load": light,
        "servers_per_gateway": (
            round(one_core / per_server, 2) if one_core and per_server else None
        ),
        "calibration": calibration.get("summary"),
    }


def markdown(summary: Mapping[str, Any], started: str, finished: str, command: str) -> str:
    def f(x: Any, digits: int = 2) -> str:
        if x is None:
            return "-"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)

    lines = [
        "# SLO benchmark at GPU scale: SIMULATED vLLM (preset h100-7b)",
        "",
        f"Run {started} to {finished}, `{command}`. **Every upstream here is simulated** "
        "(`loadtest/sim_vllm.py`, no model, tokens timed by a batching model calibrated to "
        "Qwen2.5-7B-Instruct on one H100); the gateway, the load generator and the simulators "
        "are real processes sharing 2 CPU cores, with other people's processes (column "
        "'others'). Per-level details: `1-server/slo.md`, `4-servers/slo.md`.",
        "",
        f"Simulated capacity of one H100: **{f(summary['per_server_capacity_rps'], 1)} "
        "requests/s** of the mix (virtual-time closed loop at max_num_seqs 256).",
        "",
    ]
    for n, data in summary["servers"].items():
        lines += [
            f"## {n} simulated H100(s), capacity {f(data['capacity_rps'], 1)} req/s",
            "",
            "Total goodput (req/s within SLA) a / b / c, realtime attainment, chat TTFT p95 (s):",
            "",
            "| load | rate/s | goodput a | goodput b | goodput c | c / b | realtime a / b / c "
            "| chat TTFT p95 a / b / c | others' cores (max) | sim lost s (max) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in data["goodput"]:
            a, b, c = (row.get(k, {}) for k in "abc")
            ratio = (
                f"{c['goodput_rps'] / b['goodput_rps']:.2f}x"
                if b.get("goodput_rps") and c.get("goodput_rps") is not None
                else "-"
            )
            lines.append(
                f"| {row['level']:g}x | {row['rate_rps']:.0f} | {f(a.get('goodput_rps'))} "
                f"| {f(b.get('goodput_rps'))} | {f(c.get('goodput_rps'))} | {ratio} "
                f"| {f(a.get('realtime_attainment'))} / {f(b.get('realtime_attainment'))} / "
                f"{f(c.get('realtime_attainment'))} | {f(a.get('interactive_ttft_p95_s'))} / "
                f"{f(b.get('interactive_ttft_p95_s'))} / {f(c.get('interactive_ttft_p95_s'))} "
                f"| {f(_most(row, 'others_cores'))} | {f(_most(row, 'sim_lost_s'))} |"
            )
        lines += [
            "",
            "The gateway's own CPU (c runs; /proc utime+stime of the gateway process):",
            "",
            "| load | rate/s | requests | answered | streamed tokens | gateway cores | CPU/request "
            "| CPU/streamed token | one core at | others | load-gen lag | sim lost s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in data["gateway"]:
            lines.append(
                f"| {g['level']:g}x | {g['rate_rps']:.0f} | {g['requests']} | {g['ok']}"
                f"{'' if g['served_all'] else ' (not all)'} | {g['streamed_tokens']} | {f(g['gateway_cores'])} | "
                f"{f(g['cpu_per_request_ms'])} ms | {f(g['cpu_per_streamed_token_us'], 1)} µs | "
                f"{f(g['one_core_at_rps'], 0)} req/s | {f(g['others_cores'])} | "
                f"{f(g['loadgen_max_lag_s'])} s | {f(g['sim_lost_s'])} |"
            )
        lines.append("")
    lines += [
        "## The gateway at light load (c at 0.25x of one simulated H100)",
        "",
        "| rate/s | requests | answered | gateway cores | CPU/request | CPU/streamed token "
        "| one core at | others |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in summary["light_load"]:
        lines.append(
            f"| {g['rate_rps']:.0f} | {g['requests']} | {g['ok']} | {f(g['gateway_cores'])} "
            f"| {f(g['cpu_per_request_ms'])} ms | {f(g['cpu_per_streamed_token_us'], 1)} µs "
            f"| {f(g['one_core_at_rps'], 0)} req/s | {f(g['others_cores'])} |"
        )
    lines += [
        "",
        "## The limit",
        "",
        "Over the gateway runs that answered at least 95% of their requests "
        f"({summary['cost_runs']} runs; CPU / answered requests), median gateway CPU per "
        f"request: **{f(summary['gateway_cpu_per_request_ms_median'])} ms** (this mix: ~45 generated tokens per request, 5 of 10 requests streamed); per "
        f"streamed token: **{f(summary['gateway_cpu_per_streamed_token_us_median'], 1)} µs** "
        "(all of the gateway's CPU divided by the streamed tokens: an upper bound per token). "
        f"One gateway process fills one core at about **"
        f"{f(summary['gateway_one_core_at_rps'], 0)} requests/s**, which is "
        f"**{f(summary['servers_per_gateway'])} simulated H100s** at "
        f"{f(summary['per_server_capacity_rps'], 0)} req/s each.",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (n, data), marker in zip(summary["servers"].items(), ("o", "s"), strict=False):
        rows = data["gateway"]
        ax.plot(
            [r["rate_rps"] for r in rows],
            [r["gateway_cores"] for r in rows],
            marker=marker,
            label=f"{n} simulated H100(s)",
        )
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="one core")
    if summary["gateway_cpu_per_request_ms_median"]:
        top = max(
            (r["rate_rps"] for d in summary["servers"].values() for r in d["gateway"]), default=1
        )
        xs = [0, top]
        ax.plot(
            xs,
            [x * summary["gateway_cpu_per_request_ms_median"] / 1000 for x in xs],
            color="grey",
            linestyle=":",
            label="median CPU/request x rate",
        )
    ax.set_xlabel("arrival rate (requests/s), SIMULATED upstreams")
    ax.set_ylabel("gateway CPU (cores)")
    ax.set_title("Gateway CPU vs arrival rate (simulated vLLM, h100-7b)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gateway_cpu.png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default="1,4", help="simulated H100s per run [1,4]")
    p.add_argument("--levels", default="0.5,1,1.5,2")
    p.add_argument("--configs", default="a,b,c")
    p.add_argument("--preset", default="h100-7b")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--logs", type=Path, default=ROOT / "test-output" / "sim")
    p.add_argument("--budget-min", type=float, default=6.5, help="per server count [6.5]")
    p.add_argument(
        "--summarize-only", action="store_true", help="rewrite the summary from saved runs"
    )
    args = p.parse_args(argv)
    if args.summarize_only:
        return write_summary(args, argv, *load_saved(args))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    print("1. the cpu preset against the real CPU runs (virtual time)", flush=True)
    sim_calibrate.main(["--out", str(args.out)])
    calibration = json.loads((args.out / "calibration.json").read_text())
    reports: dict[int, dict[str, Any]] = {}
    for n in (int(x) for x in args.servers.split(",")):
        sub = args.out / (f"{n}-server" if n == 1 else f"{n}-servers")
        print(f"2. {n} simulated {args.preset} server(s) -> {sub}", flush=True)
        slo.main(
            [
                "--upstream", "sim", "--preset", args.preset, "--servers", str(n),
                "--levels", args.levels, "--configs", args.configs,
                "--quiet-wait", "0", "--budget-min", str(args.budget_min),
                "--out", str(sub), "--logs", str(args.logs / f"{n}"),
                "--note", "SIMULATED upstreams (loadtest/sim_vllm.py): no GPU, no model.",
            ]
        )  # fmt: skip
        reports[n] = json.loads((sub / "slo.json").read_text())
    cost_dir = args.out / "cost"
    print(f"3. the gateway's cost at light load (c at 0.25x of one server) -> {cost_dir}")
    slo.main(
        [
            "--upstream", "sim", "--preset", args.preset, "--servers", "1",
            "--levels", "0.25", "--configs", "c", "--quiet-wait", "0",
            "--out", str(cost_dir), "--logs", str(args.logs / "cost"),
            "--note", "SIMULATED upstream; the gateway's CPU per request at light load.",
        ]
    )  # fmt: skip
    cost = json.loads((cost_dir / "slo.json").read_text())
    return write_summary(args, argv, reports, calibration, cost, started)


def load_saved(
    args: argparse.Namespace,
) -> tuple[dict[int, dict[str, Any]], dict[str, Any], dict[str, Any], str]:
    reports = {}
    for n in (int(x) for x in args.servers.split(",")):
        sub = args.out / (f"{n}-server" if n == 1 else f"{n}-servers")
        reports[n] = json.loads((sub / "slo.json").read_text())
    calibration = json.loads((args.out / "calibration.json").read_text())
    cost = json.loads((args.out / "cost" / "slo.json").read_text())
    started = min([r["started"] for r in reports.values()])
    return reports, calibration, cost, started


def write_summary(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    reports: Mapping[int, Mapping[str, Any]],
    calibration: Mapping[str, Any],
    cost: Mapping[str, Any],
    started: str,
) -> int:
    summary = summarize(reports, calibration, cost)
    finished = max(r["finished"] for r in [*reports.values(), cost])
    command = "./launch/bench.sh sim " + " ".join(sys.argv[1:] if argv is None else argv)
    summary.update({"started": started, "finished": finished, "command": command})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown(summary, started, finished, command))
    plot(summary, args.out)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Statistics, the markdown report and the plots of the SLO benchmark (``loadtest/slo.py``).

Definitions used throughout (they are repeated in the report):

- measured: requests that arrived after the warm-up and before the end of arrivals;
- latency and TTFT percentiles: over the measured requests that got a complete answer;
- SLO attainment: the fraction of measured requests that got a complete answer within the
  task's ``sla_latency_s`` and, for streams, a first token within ``sla_ttft_s``; errors,
  lost requests and requests cut off when already late count as misses; a request cut off
  at the run's end while it could still have made its SLA is "undecided" and left out;
- goodput: attained requests per second of the measurement window;
- longest wait (batch): the largest time to first token, or, for a request that never got
  one, the time it waited until it ended (error, or cut off at the run's end).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.config import Config
from loadtest.openloop import Result

CONFIG_LABELS = {
    "a": "(a) vLLM alone, FCFS",
    "b": "(b) vLLM alone, static priority",
    "c": "(c) gateway, shipped task table",
    "d": "(d) gateway, SLA-first task table",
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": _round(percentile(values, q)) for q in (50, 95, 99)}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def attained(result: Result, sla_latency_s: float, sla_ttft_s: float, stream: bool) -> bool:
    if result.outcome != "ok" or result.latency is None or result.latency > sla_latency_s:
        return False
    return not stream or (result.ttft is not None and result.ttft <= sla_ttft_s)


def undecided(result: Result, sla_latency_s: float, sla_ttft_s: float, stream: bool) -> bool:
    """Cut off by the run's end while it could still have met its SLA: no verdict either way.

    (Batch's SLA is 600 s; a run waits 60 s after its last arrival. Counting such a request
    as a miss would blame the benchmark's patience on the server.)
    """
    if result.outcome != "cutoff" or result.elapsed is None or result.elapsed > sla_latency_s:
        return False
    if not stream:
        return True
    first = result.ttft if result.ttft is not None else result.elapsed
    return first <= sla_ttft_s


def waited(result: Result) -> float | None:
    """How long the request waited for its first token (a lower bound if it never got one)."""
    if result.ttft is not None:
        return result.ttft
    if result.outcome in ("error", "cutoff", "lost"):
        return result.elapsed
    return result.latency  # a non-streamed answer: its whole latency


def class_stats(
    results: Iterable[Result], config: Config, streams: Mapping[str, bool], window_s: float
) -> dict[str, dict[str, Any]]:
    """Per priority class: counts, outcomes, percentiles, attainment, goodput, longest wait."""

    def sla(r: Result) -> tuple[float, float, bool]:
        task = config.tasks[r.task]
        return task.sla_latency_s, task.sla_ttft_s, streams[r.task]

    by_class: dict[str, list[Result]] = {}
    for r in results:
        by_class.setdefault(config.tasks[r.task].priority_class, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for pclass in config.classes.names():
        rs = by_class.get(pclass)
        if not rs:
            continue
        tasks = sorted({r.task for r in rs})
        ok = [r for r in rs if r.outcome == "ok"]
        good = [r for r in rs if attained(r, *sla(r))]
        open_ = [r for r in rs if undecided(r, *sla(r))]
        decided = len(rs) - len(open_)
        waits = [w for r in rs if (w := waited(r)) is not None]
        queue = [r.queue_s for r in rs if r.queue_s is not None]
        outcomes = Counter(r.outcome for r in rs)
        out[pclass] = {
            "tasks": tasks,
            "sla_latency_s": [config.tasks[t].sla_latency_s for t in tasks],
            "sla_ttft_s": [config.tasks[t].sla_ttft_s for t in tasks],
            "n": len(rs),
            "ok": outcomes["ok"],
            "error": outcomes["error"],
            "lost": outcomes["lost"],
            "cutoff": outcomes["cutoff"],
            "reasons": dict(sorted(Counter(r.reason for r in rs if r.reason).items())),
            "latency_s": _quantiles([r.latency for r in ok if r.latency is not None]),
            "ttft_s": _quantiles([r.ttft for r in ok if r.ttft is not None]),
            "undecided": len(open_),
            "attainment": _round(len(good) / decided, 4) if decided else None,
            "goodput_rps": _round(len(good) / window_s),
            "longest_wait_s": _round(max(waits) if waits else None),
            "gateway_queue_max_s": _round(max(queue) if queue else None),
            "degraded": sum(r.degraded for r in rs),
            "completion_tokens_mean": _round(
                _mean([r.completion_tokens for r in ok if r.completion_tokens is not None]), 1
            ),
        }
    return out


def admission(
    gateway: Sequence[Result],
    twin: Sequence[Result],
    config: Config,
    streams: Mapping[str, bool],
) -> dict[str, dict[str, int]]:
    """How good the gateway's refusals were, per class, against the same trace without it.

    ``refused``: answered 429 at once (the gateway predicted a miss, or a class was behind);
    ``refused_made_it_in_b``: of those, how many met their SLA in ``twin`` (vLLM alone with
    static priority: the closest thing to "what if it had been admitted"); ``admitted``:
    everything else with a verdict; ``admitted_missed``: of those, how many missed their SLA.
    """
    twins = {r.index: r for r in twin}
    out: dict[str, dict[str, int]] = {}
    for r in gateway:
        task = config.tasks[r.task]
        sla = (task.sla_latency_s, task.sla_ttft_s, streams[r.task])
        row = out.setdefault(
            task.priority_class,
            {"refused": 0, "refused_made_it_in_b": 0, "admitted": 0, "admitted_missed": 0},
        )
        if r.status == 429:
            row["refused"] += 1
            other = twins.get(r.index)
            row["refused_made_it_in_b"] += other is not None and attained(other, *sla)
        elif not undecided(r, *sla):
            row["admitted"] += 1
            row["admitted_missed"] += not attained(r, *sla)
    return {pclass: out[pclass] for pclass in config.classes.names() if pclass in out}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def accounting(results: Sequence[Result]) -> dict[str, int]:
    """Every request sent ends as exactly one outcome; ``lost`` must be zero."""
    counts = Counter(r.outcome for r in results)
    return {
        "sent": len(results),
        "ok": counts["ok"],
        "error": counts["error"],
        "lost": counts["lost"],
        "cutoff": counts["cutoff"],
    }


# -- aggregation over repeats ------------------------------------------------------------


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (level, config, class): medians over repeats, with min and max."""
    groups: dict[tuple[float, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        for pclass, stats in run["classes"].items():
            groups.setdefault((run["level"], run["config"], pclass), []).append(stats)
    rows = []
    for (level, cfg, pclass), stats in sorted(groups.items(), key=_row_order):
        rows.append(
            {
                "level": level,
                "config": cfg,
                "class": pclass,
                "tasks": stats[0]["tasks"],
                "repeats": len(stats),
                "n": sum(s["n"] for s in stats),
                "ok": sum(s["ok"] for s in stats),
                "error": sum(s["error"] for s in stats),
                "lost": sum(s["lost"] for s in stats),
                "cutoff": sum(s["cutoff"] for s in stats),
                "undecided": sum(s.get("undecided", 0) for s in stats),
                "reasons": dict(sum((Counter(s["reasons"]) for s in stats), Counter())),
                "attainment": _spread([s["attainment"] for s in stats]),
                "goodput_rps": _spread([s["goodput_rps"] for s in stats]),
                "latency_p50_s": _spread([s["latency_s"]["p50"] for s in stats]),
                "latency_p95_s": _spread([s["latency_s"]["p95"] for s in stats]),
                "latency_p99_s": _spread([s["latency_s"]["p99"] for s in stats]),
                "ttft_p50_s": _spread([s["ttft_s"]["p50"] for s in stats]),
                "ttft_p95_s": _spread([s["ttft_s"]["p95"] for s in stats]),
                "ttft_p99_s": _spread([s["ttft_s"]["p99"] for s in stats]),
                "longest_wait_s": _spread([s["longest_wait_s"] for s in stats]),
                "degraded": sum(s["degraded"] for s in stats),
            }
        )
    return rows


def _row_order(item: tuple[tuple[float, str, str], Any]) -> tuple[float, str, int]:
    level, cfg, pclass = item[0]
    order = ("realtime", "interactive", "standard", "batch", "background")
    return level, cfg, order.index(pclass) if pclass in order else 99


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {
        "median": _round(percentile(present, 50), 4),
        "min": _round(min(present), 4),
        "max": _round(max(present), 4),
    }


# -- targets -----------------------------------------------------------------------------


def check_targets(
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    config: Config,
    level: float = 1.5,
) -> list[dict[str, Any]]:
    """The benchmark's targets at ``level`` x capacity, each with its measured value."""

    def row(cfg: str, pclass: str) -> Mapping[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["level"] == level and r["config"] == cfg and r["class"] == pclass
            ),
            None,
        )

    def median(r: Mapping[str, Any] | None, key: str) -> float | None:
        return None if r is None else r[key]["median"]

    classes = config.classes
    bound = (
        classes["realtime"].head_start_s
        - classes["batch"].head_start_s
        + config.tasks["sentiment"].queue_deadline_s
    )
    chat_ttft_sla = config.tasks["chat"].sla_ttft_s
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None, **more: Any) -> None:
        targets.append({"target": name, "measured": value, "goal": goal, "met": met, **more})

    gateways = [cfg for cfg in ("c", "d") if row(cfg, "realtime") is not None] or ["c"]
    for cfg in gateways:
        rt = median(row(cfg, "realtime"), "attainment")
        add(f"({cfg}) realtime SLO attainment", rt, ">= 0.99", None if rt is None else rt >= 0.99)
        ttft = median(row(cfg, "interactive"), "ttft_p95_s")
        add(
            f"({cfg}) interactive TTFT p95 (s)",
            ttft,
            f"<= {chat_ttft_sla:g}",
            None if ttft is None else ttft <= chat_ttft_sla,
        )
    for cfg in ("a", "b"):
        add(
            f"({cfg}) realtime SLO attainment, for comparison",
            median(row(cfg, "realtime"), "attainment"),
            "far below the gateway's",
            None,
        )
        add(
            f"({cfg}) interactive TTFT p95 (s), for comparison",
            median(row(cfg, "interactive"), "ttft_p95_s"),
            "far above the gateway's",
            None,
        )
    for cfg in gateways:
        worst = row(cfg, "batch")
        worst_wait = None if worst is None else worst["longest_wait_s"]["max"]
        add(
            f"({cfg}) batch longest wait (s)",
            worst_wait,
            f"<= {bound:g} (gap realtime-batch + realtime queue deadline)",
            None if worst_wait is None else worst_wait <= bound,
            median=median(worst, "longest_wait_s"),
        )
    lost = sum(run["accounting"]["lost"] for run in runs)
    add("requests lost, all runs and configurations", lost, "== 0", lost == 0)
    return targets


# -- markdown ----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(spread: Mapping[str, float | None], digits: int = 2, repeats: int = 1) -> str:
    text = _fmt(spread["median"], digits)
    if repeats > 1 and spread["min"] is not None and spread["max"] is not None:
        text += f" ({_fmt(spread['min'], digits)}-{_fmt(spread['max'], digits)})"
    return text


def _pct(spread: Mapping[str, float | None], repeats: int) -> str:
    if spread["median"] is None:
        return "-"
    text = f"{spread['median'] * 100:.1f}%"
    if repeats > 1 and spread["min"] is not None and spread["max"] is not None:
        text += f" ({spread['min'] * 100:.0f}-{spread['max'] * 100:.0f})"
    return text


def _reasons(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "-"


def markdown(report: Mapping[str, Any]) -> str:
    settings, rows = report["settings"], report["summary"]
    lines = [
        "# SLO benchmark: vLLM alone vs the gateway",
        "",
        f"Run {report['started']} to {report['finished']} ({report['wall_min']:.1f} min), "
        f"`{report['command']}`.",
        "",
        f"**Machine:** {report['machine_text']}. Everything (vLLM, gateway, load generator) "
        "shared these CPUs; other developers' processes may have used them too (load averages "
        "per run are in the JSON and below).",
        "",
        f"**Code:** commit {report['source']['commit'][:12]}"
        + (
            f", with uncommitted gateway changes ({len(report['source']['gateway_changes'])} "
            "files; others were editing it)"
            if report["source"]["gateway_changes"]
            else ""
        )
        + ".",
        "",
        (
            f"**Model:** {settings['model']}, `--max-num-seqs {settings['max_num_seqs']}` per "
            f"server, priority scheduling, gateway `--window {settings['window']}`. "
            "**SIMULATED upstreams** (see loadtest/README-sim.md): the gateway, the load "
            "generator and the simulators are real processes on this machine's CPUs."
            if settings.get("upstream") == "sim"
            else f"**Model:** {settings['model']} on vLLM's CPU build, `--max-num-seqs "
            f"{settings['max_num_seqs']}`, gateway `--window {settings['window']}`, "
            f"flags from `launch/vllm.sh` (priority scheduling, prefix caching)"
            + (f", extra {settings['vllm_extra']}" if settings["vllm_extra"] else "")
            + (
                f", VLLM_CPU_KVCACHE_SPACE={settings['kv_cache_gib']}"
                f", VLLM_CPU_OMP_THREADS_BIND={settings['omp_bind']}"
                if "omp_bind" in settings
                else ""
            )
            + "."
        ),
        "",
        "**Workload:** open-loop Poisson arrivals, the same trace (times, prompts, seeds) for "
        f"every configuration at a level; mix {settings['mix']} by request count; "
        + ", ".join(f"{t} {d}" for t, d in settings["shapes"].items())
        + f". Each run: {settings['duration_s']:g} s of arrivals, the first "
        f"{settings['warmup_s']:g} s excluded as warm-up, then up to {settings['drain_s']:g} s "
        "for outstanding requests to finish (what is still running then is `cutoff`). "
        f"Repeats: {settings['repeats']}.",
        "",
        f"**Capacity** (vLLM alone, closed loop at {settings['max_num_seqs']} concurrent "
        f"requests of the mix): **{report['capacity']['rate_rps']:.2f} requests/s**; "
        "load levels are multiples of it.",
        "",
        "**Configurations:** "
        + "; ".join(f"{CONFIG_LABELS[c]}" for c in settings["configs"])
        + ". (a) sends every request with vLLM priority 0: vLLM's priority scheduler breaks "
        "ties by arrival, so that is FCFS, on the same server. (b) sends the class's static "
        "priority (its head start: realtime -100, interactive -90, standard -80, batch -10; lower "
        "runs first), no aging, no deadlines. Both send the exact body the gateway builds (system "
        "prompt, label constraint, max_tokens)."
        + (
            f" (d) is the gateway with `--tasks {settings['tuned_tasks']}`, the SLA-first "
            "table: the same SLAs, lower classes refused at the door sooner and given less of "
            "the window, interactive requests that cannot start within their TTFT SLA answered "
            "504 at once (see the file)."
            if settings.get("tuned_tasks")
            else ""
        ),
        "",
        *(
            [
                f"**This run was aborted:** {report['aborted']}; the tables hold what was measured.",
                "",
            ]
            if report.get("aborted")
            else []
        ),
        *(
            [
                "**Skipped (time budget):** "
                + ", ".join(f"{s['config']} at {s['level']:g}x" for s in report["skipped"]),
                "",
            ]
            if report.get("skipped")
            else []
        ),
        "## Targets (at 1.5x capacity)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        value = t["measured"]
        shown = (
            "-" if value is None else (f"{value:g}" if isinstance(value, int) else f"{value:.3f}")
        )
        lines.append(f"| {t['target']} | {shown} | {t['goal']} | {met} |")
    lines += [
        "",
        "## Results by load level, configuration and class",
        "",
        "Latency and TTFT in seconds over completed answers; attainment over the measured "
        "requests with a verdict (errors, lost requests and requests cut off when already "
        "late count as misses; `undecided` ones were cut off at the run's end while they could "
        "still have made their SLA, e.g. batch with its 600 s SLA); goodput is requests within "
        "SLA per second of the measurement window. "
        + (
            "Cells show the median over repeats (min-max)."
            if settings["repeats"] > 1
            else "One run per cell."
        ),
        "",
        "| load | config | class (task) | n | attain | goodput/s | lat p50 | lat p95 | lat p99 "
        "| TTFT p50 | TTFT p95 | TTFT p99 | longest wait | errors (reasons) | lost "
        "| cutoff (undecided) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reps = r["repeats"]
        lines.append(
            f"| {r['level']:g}x | {r['config']} | {r['class']} ({', '.join(r['tasks'])}) "
            f"| {r['n']} | {_pct(r['attainment'], reps)} | {_cell(r['goodput_rps'], 2, reps)} "
            f"| {_cell(r['latency_p50_s'], 2, reps)} | {_cell(r['latency_p95_s'], 2, reps)} "
            f"| {_cell(r['latency_p99_s'], 2, reps)} | {_cell(r['ttft_p50_s'], 2, reps)} "
            f"| {_cell(r['ttft_p95_s'], 2, reps)} | {_cell(r['ttft_p99_s'], 2, reps)} "
            f"| {_cell(r['longest_wait_s'], 1, reps)} | {r['error']} ({_reasons(r['reasons'])}) "
            f"| {r['lost']} | {r['cutoff']} ({r['undecided']}) |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| # | load | config | rate/s | sent | ok | error | lost | cutoff | wall s "
        "| gateway CPU | load-gen CPU | vLLM CPU | others' CPU | max send lag "
        "| load avg start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(report["runs"], 1):
        acc, cpu = run["accounting"], run["cpu"]
        gw = "-" if cpu["gateway_pct"] is None else f"{cpu['gateway_pct']:.1f}%"
        vl = "-" if cpu["vllm_pct"] is None else f"{cpu['vllm_pct']:.0f}%"
        others = cpu.get("others_cores")
        ot = "-" if others is None else f"{others * 100:.0f}%"
        lines.append(
            f"| {i} | {run['level']:g}x | {run['config']} | {run['rate_rps']:.2f} | {acc['sent']} "
            f"| {acc['ok']} | {acc['error']} | {acc['lost']} | {acc['cutoff']} "
            f"| {run['wall_s']:.0f} | {gw} | {cpu['loadgen_pct']:.1f}% | {vl} | {ot} "
            f"| {run['max_lag_s']:.3f} s "
            f"| {'/'.join(f'{x:g}' for x in run['loadavg_start'])} -> "
            f"{'/'.join(f'{x:g}' for x in run['loadavg_end'])} |"
        )
    lines += [
        "",
        "CPU columns: CPU seconds used during the run divided by its wall time (100% = one "
        "core), from /proc/PID/stat; vLLM counts its API server, engine and worker; "
        "others' CPU is the machine's busy time (/proc/stat) minus these, i.e. what other "
        "people's processes took during the run."
        + (
            " Before each run the benchmark waited (up to --quiet-wait) for others to drop "
            "below --quiet-cores."
            if any("waited_for_quiet_s" in run for run in report["runs"])
            else ""
        ),
        "",
        "Plots: `latency_vs_load.png` (p95 latency and p95 TTFT by class), "
        "`attainment_vs_load.png` (SLO attainment and goodput by class).",
        "",
    ]
    lines += _admission_lines(report.get("admission") or [])
    lines += _gateway_lines(report["runs"])
    return "\n".join(lines)


def _admission_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Refusals and misses (c, measured part)",
        "",
        "Refused: answered 429 at once; of those, how many met their SLA when the same trace "
        "went to vLLM alone (b). Admitted: everything else with a verdict; of those, how many "
        "missed their SLA.",
        "",
        "| load | repeat | class | refused | refused, made it in b | admitted | admitted, missed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for pclass, c in row["classes"].items():
            lines.append(
                f"| {row['level']:g}x | {row['repeat']} | {pclass} | {c['refused']} "
                f"| {c['refused_made_it_in_b']} | {c['admitted']} | {c['admitted_missed']} |"
            )
    return [*lines, ""]


def _gateway_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    watched = [run for run in runs if run.get("gateway")]
    if not watched:
        return []
    lines = [
        "## The gateway's window and preemptions (read from its /metrics once a second)",
        "",
        "| load | config | repeat | window min / median / max / last | preemptions "
        "| per minute | tokens resumed |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in watched:
        g, w = run["gateway"], run["gateway"]["window"]
        sizes = " / ".join(_fmt(w[k], 0) for k in ("min", "median", "max", "last"))
        lines.append(
            f"| {run['level']:g}x | {run['config']} | {run['repeat']} | {sizes} "
            f"| {g['preemptions']} | {_fmt(g['preemptions_per_min'])} | {g['resumed_tokens']} |"
        )
    return [*lines, ""]


# -- plots -------------------------------------------------------------------------------

_COLOURS = {"a": "tab:red", "b": "tab:orange", "c": "tab:blue", "d": "tab:green"}
_MARKERS = {"a": "s", "b": "^", "c": "o", "d": "D"}
_DODGE = {"a": -0.06, "b": -0.02, "c": 0.02, "d": 0.06}  # x offsets so equal values stay visible


def plot(report: Mapping[str, Any], config: Config, out_dir: Any) -> list[str]:
    """Write the PNGs into ``out_dir``; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = report["summary"]
    classes = [c for c in config.classes.names() if any(r["class"] == c for r in rows)]
    configs = report["settings"]["configs"]
    levels = sorted({r["level"] for r in rows})
    plain = FuncFormatter(lambda y, _: f"{y:g}")

    def style(ax: Any, ylabel: str, log: bool) -> None:
        ax.set_xticks(levels, [f"{x:g}x" for x in levels])
        ax.set_xlim(min(levels) - 0.25, max(levels) + 0.25)
        ax.set_xlabel("offered load (x capacity)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)

    def series(cfg: str, pclass: str, key: str) -> tuple[list[float], list[float], Any]:
        pts = [
            r
            for r in rows
            if r["config"] == cfg and r["class"] == pclass and r[key]["median"] is not None
        ]
        xs = [r["level"] + _DODGE[cfg] for r in pts]
        ys = [r[key]["median"] for r in pts]
        err = [
            [y - r[key]["min"] for y, r in zip(ys, pts, strict=True)],
            [r[key]["max"] - y for y, r in zip(ys, pts, strict=True)],
        ]
        return xs, ys, err

    def sla(pclass: str, key: str) -> float | None:
        row = next(r for r in rows if r["class"] == pclass)
        task = config.tasks[row["tasks"][0]]
        return task.sla_latency_s if key.startswith("latency") else task.sla_ttft_s

    names = []
    fig, axes = plt.subplots(2, len(classes), figsize=(4.2 * len(classes), 7.5), squeeze=False)
    for col, pclass in enumerate(classes):
        task = next(r for r in rows if r["class"] == pclass)["tasks"][0]
        for row_i, (key, what) in enumerate((("latency_p95_s", "latency"), ("ttft_p95_s", "TTFT"))):
            ax = axes[row_i][col]
            drawn = False
            for cfg in configs:
                xs, ys, err = series(cfg, pclass, key)
                if xs:
                    drawn = True
                    ax.errorbar(
                        xs, ys, yerr=err, label=CONFIG_LABELS[cfg], color=_COLOURS[cfg],
                        marker=_MARKERS[cfg], capsize=3,
                    )  # fmt: skip
            if not drawn:
                ax.text(0.5, 0.5, "not streamed:\nno TTFT", ha="center", va="center",
                        transform=ax.transAxes, color="grey")  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                limit = sla(pclass, key)
                if limit is not None:
                    ax.axhline(limit, color="black", linestyle="--", linewidth=1, label="SLA")
                style(ax, f"p95 {what} (s, log scale)", log=True)
            ax.set_title(f"{pclass} ({task}): p95 {what}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("Latency by class vs offered load (lower is better; dashed line: the task's SLA)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out_dir / "latency_vs_load.png", dpi=110)
    plt.close(fig)
    names.append("latency_vs_load.png")

    fig, axes = plt.subplots(2, len(classes), figsize=(4.2 * len(classes), 7.5), squeeze=False)
    for col, pclass in enumerate(classes):
        task = next(r for r in rows if r["class"] == pclass)["tasks"][0]
        for row_i, (key, what) in enumerate(
            (("attainment", "SLO attainment (%)"), ("goodput_rps", "goodput (req/s in SLA)"))
        ):
            ax = axes[row_i][col]
            for cfg in configs:
                xs, ys, err = series(cfg, pclass, key)
                scale = 100.0 if key == "attainment" else 1.0
                ax.errorbar(
                    xs, [y * scale for y in ys], yerr=[[e * scale for e in side] for side in err],
                    label=CONFIG_LABELS[cfg], color=_COLOURS[cfg], marker=_MARKERS[cfg],
                    capsize=3,
                )  # fmt: skip
            if key == "attainment":
                ax.set_ylim(-3, 103)
                if pclass == "realtime":
                    ax.axhline(99, color="black", linestyle="--", linewidth=1, label="target 99%")
            else:
                ax.set_ylim(bottom=0)
            style(ax, what, log=False)
            ax.set_title(f"{pclass} ({task}): {what.split(' (')[0]}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("SLO attainment and goodput by class vs offered load (higher is better)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out_dir / "attainment_vs_load.png", dpi=110)
    plt.close(fig)
    names.append("attainment_vs_load.png")
    return names

"""Where does the gateway's memory go? A probe inside the gateway and a fast mixed load.

    .venv/bin/python loadtest/memprobe.py --minutes 12                 # RSS and structures
    .venv/bin/python loadtest/memprobe.py --minutes 12 --fix expiry    # with a proposed fix
    .venv/bin/python loadtest/memprobe.py --minutes 6 --tracemalloc 6  # where growth is allocated

It starts the paced fake upstream (``loadtest/fake_upstream.py``, ~40 ms a generation; or
vLLM and the tiny model with ``--upstream vllm``, as the soak does) and the gateway exactly as ``python -m gateway`` runs it (uvicorn, uvloop, httptools, the
start-up heap frozen), wrapped in a probe: ``GET /_memprobe`` answers from inside the
gateway's process with

- its RSS; the C allocator's view (``mallinfo2``: bytes in use, free in its arenas) and,
  with ``?trim=1``, RSS again after ``malloc_trim(0)`` hands free memory back;
- tracemalloc's traced bytes (``--tracemalloc N`` frames; off by default, as tracing costs
  CPU and memory of its own) and, with ``?snapshot=PATH``, a snapshot dumped there;
- live objects by type after a full collection (and how many that collection freed);
- the size of every structure that holds per-request state: the scheduler's expiry heap
  (by ticket state), its queues and drain-rate window, the dispatcher's waiters, the status
  page's rings, the shutdown drain's watch set, asyncio tasks, pooled upstream connections,
  uvicorn's connections, Prometheus series.

One load process drives the soak's mix (``loadtest/soak.py``, with its timings for the
upstream: ok, 400, 404, 429, 504 in the queue and in band, abandoned streams, clients giving
up in the queue) at the soak's concurrency and window, probing every
``--probe-every`` seconds. With ``--tracemalloc`` it dumps snapshots after the warm-up, at
half time and at the end, and prints the allocation sites that grew most over the second half
(everything bounded is full by then) and over the whole run.

``--fix NAME`` applies a proposed fix to a module another engineer is rewriting, as a patch at
start-up, so its effect can be measured before it lands (see ``FIXES``). Results go to
``loadtest/out/memprobe-<label>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import heapq
import json
import random
import statistics
import sys
import time
import tracemalloc
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `loadtest.*` and `gateway` importable
    sys.path.insert(0, str(ROOT))

from loadtest.soak import (  # noqa: E402
    FAKE_PROFILE,
    FAKE_WINDOW,
    MIX,
    VLLM_PROFILE,
    WINDOW,
    keys_file,
    one_request,
    start_upstream,
)
from loadtest.stack import describe_machine, gateway_server, port_is_free  # noqa: E402

OUT = ROOT / "loadtest" / "out"
#: Types whose live counts are always reported (the rest: the most numerous).
WATCHED_TYPES = (
    "Ticket", "Exchange", "Step", "OpenStream", "UpstreamResponse", "ClientResponse",
    "ResponseHandler", "Task", "Future", "TimerHandle", "coroutine", "async_generator",
    "frame", "cell", "function", "Request", "Response", "StreamingResponse", "_Watched",
    "HttpToolsProtocol", "HttpProtocol", "RequestResponseCycle", "traceback",
)  # fmt: skip


# -- inside the gateway ---------------------------------------------------------------------


def _fix_expiry() -> None:
    """scheduler.py: drop tickets that left the queue from the expiry heap once they are the
    majority (the proposed fix; tickets otherwise stay until their queue deadline)."""
    from gateway import scheduler as s

    admit = s.Scheduler.admit

    def patched(self: s.Scheduler, ticket: s.Ticket, now: float) -> s.Admitted | s.Rejected:
        heap = self._expiries
        if len(heap) > 2 * self._queued + 64:
            self._expiries = [e for e in heap if e[2].state is s.State.QUEUED and e[1] == e[2].seq]
            heapq.heapify(self._expiries)
        return admit(self, ticket, now)

    s.Scheduler.admit = patched  # type: ignore[method-assign]


FIXES: dict[str, Callable[[], None]] = {"expiry": _fix_expiry}

_libc = ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _mallinfo() -> dict[str, int]:
    _libc.mallinfo2.restype = _Mallinfo2
    info = _libc.mallinfo2()
    return {
        "arena_kib": info.arena // 1024,  # heap obtained with brk/sbrk
        "mmapped_kib": info.hblkhd // 1024,  # large blocks obtained with mmap
        "in_use_kib": info.uordblks // 1024,  # allocated and not freed
        "free_kib": info.fordblks // 1024,  # free inside the arenas
    }


def _ticket_bytes(entry: tuple[float, int, Any]) -> int:
    """What one expiry-heap entry keeps alive when nothing else holds its ticket: the tuple,
    its key numbers, the ticket and its own floats (names and policies are shared)."""
    ticket = entry[2]
    own = [getattr(ticket, f) for f in ticket.__slots__]
    floats = sum(sys.getsizeof(v) for v in own if isinstance(v, float))
    return (
        8  # the list's slot
        + sys.getsizeof(entry)
        + sys.getsizeof(entry[0])
        + sys.getsizeof(entry[1])
        + sys.getsizeof(ticket)
        + floats
    )


def measure(state: dict[str, Any], server: Any, query: dict[str, str]) -> dict[str, Any]:
    rt, drain = state["runtime"], state["drain"]
    out: dict[str, Any] = {"rss_kib": rss_kib(), "allocator": _mallinfo()}
    if tracemalloc.is_tracing():
        current = tracemalloc.get_traced_memory()[0]
        out["traced_kib"] = current // 1024
        out["tracemalloc_overhead_kib"] = tracemalloc.get_tracemalloc_memory() // 1024
        if path := query.get("snapshot"):
            tracemalloc.take_snapshot().dump(path)
            out["snapshot"] = path
    out["gc_freed"] = gc.collect()
    objects = gc.get_objects()
    types = Counter(type(o).__name__ for o in objects)
    del objects
    out["objects"] = {
        "tracked": sum(types.values()),
        "frozen": gc.get_freeze_count(),
        "allocated_blocks": sys.getallocatedblocks(),
        "top": dict(types.most_common(20)),
        "watched": {name: types.get(name, 0) for name in WATCHED_TYPES},
    }
    sch, disp = rt.scheduler, rt.dispatcher
    heap = sch._expiries
    states = Counter(entry[2].state.value for entry in heap)
    out["scheduler"] = {
        "expiry_heap": len(heap),
        "expiry_heap_by_state": dict(states),
        "expiry_heap_bytes_each": _ticket_bytes(heap[0]) if heap else None,
        "queued": sch.queued,
        "inflight": sum(w.inflight for w in sch.windows.values()),  # 0 when idle, or a slot leaked
        "drain_rate_times": len(sch.drain._times),
        "waiters": len(disp._waiters),
    }
    out["recent"] = {
        "per_task": rt.recent.per_task,
        "rings": {task: len(ring) for task, ring in rt.recent._rings.items()},
    }
    connector = rt.client._session.connector
    out["runtime"] = {
        "drain_watched": len(drain._watched),
        "asyncio_tasks": len(asyncio.all_tasks()),
        "upstream_idle_conns": sum(len(c) for c in connector._conns.values()),
        "upstream_acquired_conns": len(connector._acquired),
        "metric_series": sum(len(m.samples) for m in rt.metrics.registry.collect()),
        "ttft_keys": len(rt.ttft._values),
        "uvicorn_connections": len(server.server_state.connections),
        "uvicorn_tasks": len(server.server_state.tasks),
    }
    if why := query.get("why"):
        out["why"] = referrer_chains(why)
    if query.get("trim") == "1":
        before = rss_kib()
        _libc.malloc_trim(0)
        out["trim"] = {"before_kib": before, "after_kib": rss_kib()}
    return out


def _describe(obj: Any) -> str:
    name = type(obj).__name__
    if name == "frame":
        return f"frame {obj.f_code.co_name} ({Path(obj.f_code.co_filename).name}:{obj.f_lineno})"
    if name == "traceback":
        code = obj.tb_frame.f_code
        return f"traceback {code.co_name} ({Path(code.co_filename).name}:{obj.tb_lineno})"
    if name == "function":
        return f"function {obj.__qualname__}"
    if name == "cell":
        return "cell"
    if isinstance(obj, dict):
        return f"dict keys={sorted(map(str, obj))[:6]}"
    if isinstance(obj, BaseException):
        return f"{name}: {str(obj)[:60]}"
    return name


def referrer_chains(type_name: str, samples: int = 3, depth: int = 14) -> list[list[str]]:
    """For a few live objects of ``type_name`` (the newest): who holds them, and who holds
    that, upwards (the first holder at each step that is not this function's own bookkeeping).
    """
    found = [o for o in gc.get_objects() if type(o).__name__ == type_name]
    picked = found[-samples:]
    del found
    chains: list[list[str]] = []
    here = sys._getframe()
    i = 0
    while i < len(picked):
        current: Any = picked[i]
        chain = [_describe(current)]
        mine = {id(picked), id(here), id(chains), id(chain)}
        for _ in range(depth * 20):
            if len(chain) > depth:
                break
            holders = gc.get_referrers(current)
            mine.add(id(holders))
            others = [r for r in holders if id(r) not in mine]
            mine.add(id(others))
            if not others:
                chain.append("(no tracked holder: held from C code, or a root)")
                break
            current = others[0]
            mine.add(id(current))
            step = f"{_describe(current)}  [{len(others)} holders]"
            if chain[-1].startswith("traceback") and step.startswith("traceback"):
                # A traceback's outer frames: climb them, counting how many and which.
                climbed = chain[-1].split(" | ")
                climbed[0] = (
                    f"traceback x{int(climbed[0].split()[1][1:]) + 1 if climbed[0].startswith('traceback x') else 2}"
                )
                if len(climbed) < 8:
                    climbed.append(step.removeprefix("traceback "))
                chain[-1] = " | ".join(climbed)
                continue
            chain.append(step)
            del holders, others
        chains.append(chain)
        i += 1
    return chains


class Probe:
    """ASGI wrapper: ``GET /_memprobe`` measures; everything else goes to the gateway."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] | None = None
        self.server: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.state = scope["state"]  # the gateway's lifespan puts its runtime here
        elif scope["type"] == "http" and scope["path"] == "/_memprobe":
            query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
            assert self.state is not None
            body = json.dumps(measure(self.state, self.server, query)).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def serve(argv: list[str]) -> int:
    """The gateway as ``python -m gateway`` runs it, inside the probe."""
    p = argparse.ArgumentParser(prog="memprobe.py serve")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    p.add_argument("--fix", action="append", default=[], choices=sorted(FIXES))
    a, gateway_argv = p.parse_known_args(argv)
    if gateway_argv[:1] == ["--"]:
        gateway_argv = gateway_argv[1:]
    if a.tracemalloc:
        tracemalloc.start(a.tracemalloc)
    for name in a.fix:
        FIXES[name]()
    from gateway.__main__ import build_server, configure_logging, listen_host
    from gateway.app import create_app
    from gateway.settings import parse_settings
    from gateway.shutdown import Drain

    settings = parse_settings(gateway_argv)
    configure_logging(settings.log_level)
    drain = Drain(settings.shutdown_grace_s)
    probe = Probe(create_app(settings, drain=drain))
    server = build_server(probe, settings, listen_host(settings.host, keys_enabled=True), drain)
    probe.server = server
    server.run()
    return 0


# -- the load and the report ----------------------------------------------------------------


async def drive(
    url: str,
    pid: int,
    a: argparse.Namespace,
    snapshot: Callable[[str], str | None],
) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    kinds, weights = list(MIX), list(MIX.values())
    connector = aiohttp.TCPConnector(limit=a.concurrency * 2)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def probe(query: str = "") -> dict[str, Any]:
            async with session.get(f"{url}/_memprobe?{query}") as r:
                result: dict[str, Any] = await r.json()
            return result

        async def worker(rng: random.Random, until: float, into: Counter[str]) -> None:
            while time.monotonic() < until:
                kind = rng.choices(kinds, weights)[0]
                try:
                    outcome = await one_request(session, url, kind, rng, a.profile)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = f"exception:{type(exc).__name__}"
                into[f"{kind} {outcome}"] += 1

        warm: Counter[str] = Counter()
        until = time.monotonic() + a.warmup
        await asyncio.gather(
            *(worker(random.Random(a.seed - i), until, warm) for i in range(a.concurrency))
        )
        print(f"warm-up: {sum(warm.values())} requests in {a.warmup:g} s", flush=True)
        started = time.monotonic()
        until = started + a.minutes * 60
        workers = [
            asyncio.create_task(worker(random.Random(a.seed + i), until, counts))
            for i in range(a.concurrency)
        ]
        samples: list[dict[str, Any]] = []
        snapshots: dict[str, str] = {}
        half_taken = False
        print(
            f"{'t s':>5} {'requests':>9} {'RSS MiB':>8} {'traced':>7} {'heap':>7} "
            f"{'queued':>6} {'rings':>17} {'tasks':>5} {'objects':>8} "
            f"{'ClResp':>6} {'uvProt':>6} {'frames':>6}",
            flush=True,
        )
        half = started + a.minutes * 30
        while True:
            now = time.monotonic()
            name = None
            if not samples:
                name = "start"
            elif now >= until:
                name = "end"
            elif not half_taken and now >= half:
                name, half_taken = "half", True
            query = ""
            path = snapshot(name) if name is not None else None
            if name is not None and path is not None:
                snapshots[name] = path
                query = "snapshot=" + urllib.parse.quote(path)
            m = await probe(query)
            m.update(t_s=round(now - started, 1), requests=sum(counts.values()), phase="load")
            samples.append(m)
            _print_sample(m)
            if now >= until:
                break
            wake = min(now + a.probe_every, until, half if not half_taken else until)
            await asyncio.sleep(max(wake - time.monotonic(), 0.0))
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        # Idle: in-flight work done; then once more after uvicorn's keep-alive timeout (30 s),
        # which holds a connection the client reset until it fires.
        for wait in (5, a.idle - 5) if a.idle > 5 else (a.idle,):
            await asyncio.sleep(wait)
            m = await probe("trim=1")
            m.update(t_s=round(time.monotonic() - started, 1), requests=sum(counts.values()))
            m["phase"] = "idle"
            samples.append(m)
            _print_sample(m)
        for type_name in filter(None, a.why.split(",")):
            chains = (await probe("why=" + type_name))["why"]
            m.setdefault("why", {})[type_name] = chains
            print(f"\nwho holds the idle gateway's {type_name} objects (sampled):")
            for chain in chains:
                print("   " + "\n     <- ".join(chain))
    return {"samples": samples, "counts": counts, "elapsed_s": elapsed, "snapshots": snapshots}


def _print_sample(m: dict[str, Any]) -> None:
    sch, rings = m["scheduler"], m["recent"]["rings"]
    ring_text = "/".join(str(n) for n in rings.values()) or "-"
    traced = f"{m['traced_kib'] / 1024:7.1f}" if "traced_kib" in m else f"{'-':>7}"
    watched = m["objects"]["watched"]
    protocols = watched["HttpToolsProtocol"] + watched.get("HttpProtocol", 0)  # uvicorn's, ours
    print(
        f"{m['t_s']:5.0f} {m['requests']:9d} {m['rss_kib'] / 1024:8.1f} {traced} "
        f"{sch['expiry_heap']:7d} {sch['queued']:6d} {ring_text:>17} "
        f"{m['runtime']['asyncio_tasks']:5d} {m['objects']['tracked']:8d} "
        f"{watched['ClientResponse']:6d} {protocols:6d} {watched['frame']:6d}",
        flush=True,
    )


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y), or None with fewer than three distinct x."""
    if len({x for x, _ in points}) < 3:
        return None
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def growth(old_path: str, new_path: str, top: int) -> list[dict[str, Any]]:
    """Allocation sites that grew most between two snapshots (the gateway's, not tracemalloc's)."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old = tracemalloc.Snapshot.load(old_path).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(new_path).filter_traces(ignore)
    sites = []
    for stat in new.compare_to(old, "traceback")[:top]:
        sites.append(
            {
                "kib": round(stat.size_diff / 1024, 1),
                "blocks": stat.count_diff,
                "traceback": [
                    f"{f.filename.removeprefix(str(ROOT) + '/')}:{f.lineno}" for f in stat.traceback
                ],
            }
        )
    return sites


def report(result: dict[str, Any]) -> None:
    load = [s for s in result["samples"] if s["phase"] == "load"]
    second = load[len(load) // 2 :]
    idle = result["samples"][-1]
    r_slope = slope([(s["t_s"] / 60, s["rss_kib"] / 1024) for s in second])
    per_req = slope([(s["requests"], s["rss_kib"] * 1024) for s in second])
    summary = {
        "requests": result["requests"]["total"],
        "per_s": result["requests"]["per_s"],
        "rss_mib": {
            "start": round(load[0]["rss_kib"] / 1024, 1),
            "half": round(second[0]["rss_kib"] / 1024, 1),
            "end": round(load[-1]["rss_kib"] / 1024, 1),
            "idle": round(idle["rss_kib"] / 1024, 1),
            "idle_after_malloc_trim": round(idle["trim"]["after_kib"] / 1024, 1),
        },
        "second_half_rss_slope_mib_per_min": None if r_slope is None else round(r_slope, 3),
        "second_half_rss_bytes_per_request": None if per_req is None else round(per_req, 1),
        "expiry_heap": {
            "end": load[-1]["scheduler"]["expiry_heap"],
            "bytes_each": load[-1]["scheduler"]["expiry_heap_bytes_each"],
        },
    }
    if "traced_kib" in load[0]:
        t_slope = slope([(s["requests"], s["traced_kib"] * 1024) for s in second])
        summary["second_half_traced_bytes_per_request"] = (
            None if t_slope is None else round(t_slope, 1)
        )
    result["summary"] = summary
    print("\n" + json.dumps(summary, indent=1))
    print("\noutcomes:", dict(sorted(result["requests"]["by_outcome"].items())))
    for name, sites in result.get("growth", {}).items():
        print(f"\ntracemalloc, top growth {name}:")
        for site in sites:
            where = " <- ".join(site["traceback"][:4])
            print(f"  {site['kib']:+9.1f} KiB {site['blocks']:+7d} blocks  {where}")


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="load after the warm-up")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of load before measuring")
    p.add_argument("--upstream", choices=("fake", "vllm"), default="fake")
    p.add_argument("--model", help="tiny model folder (--upstream vllm)")
    p.add_argument("--concurrency", type=int, help="clients (default: 32, vllm 8)")
    p.add_argument("--probe-every", type=float, default=30.0, help="seconds between probes")
    p.add_argument("--idle", type=float, default=35.0, help="seconds idle after the load")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="0: off")
    p.add_argument("--fix", action="append", default=[], choices=sorted(FIXES))
    p.add_argument("--top", type=int, default=12, help="growth sites to print")
    p.add_argument("--why", default="", help="types to trace holders of when idle, e.g. Ticket")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="", help="names the output (default: from --fix)")
    a = p.parse_args()
    fake = a.upstream == "fake"
    a.concurrency = a.concurrency or (32 if fake else 8)
    a.window = FAKE_WINDOW if fake else WINDOW
    a.profile = FAKE_PROFILE if fake else VLLM_PROFILE
    label = a.label or ("fix-" + "-".join(a.fix) if a.fix else "shipped")
    OUT.mkdir(parents=True, exist_ok=True)
    ports = [port for port in range(19600, 19700) if port_is_free(port)][:2]
    launcher = [sys.executable, str(Path(__file__).resolve()), "serve"]
    launcher += [f"--tracemalloc={a.tracemalloc}", *(f"--fix={f}" for f in a.fix), "--"]
    keys = keys_file(OUT / "memprobe-keys.toml")
    machine = describe_machine()
    print(f"machine: {machine.markdown()}", flush=True)
    snapshot_dir = OUT / "memprobe-snapshots"
    snapshot_dir.mkdir(exist_ok=True)

    def snapshot(name: str) -> str | None:
        return str(snapshot_dir / f"{label}-{name}.tracemalloc") if a.tracemalloc else None

    upstream, about = start_upstream(a, ports[0], OUT)
    gateway = gateway_server(
        ports[1], upstream.url, a.window, OUT / f"memprobe-{label}-gateway.log", keys=keys,
        launcher=launcher,
    )  # fmt: skip
    try:
        gateway.start().wait_ready("/ready", 60)
        print(
            f"gateway pid {gateway.pid} ({label}) -> {about['about']}; {a.minutes:g} min, "
            f"concurrency {a.concurrency}, window {a.window}, tracemalloc {a.tracemalloc or 'off'}",
            flush=True,
        )
        run = asyncio.run(drive(gateway.url, gateway.pid, a, snapshot))
    finally:
        gateway.stop()
        upstream.stop()
    counts: Counter[str] = run["counts"]
    by_outcome: Counter[str] = Counter()
    for key, n in counts.items():
        by_outcome[key.split(" ", 1)[1]] += n
    total = sum(counts.values())
    result: dict[str, Any] = {
        "label": label,
        "machine": asdict(machine),
        "upstream": about["about"],
        "config": {k: v for k, v in vars(a).items() if k != "profile"}
        | {k: v for k, v in about.items() if k != "about"}
        | {"mix": MIX, "profile": asdict(a.profile)},
        "requests": {
            "total": total,
            "per_s": round(total / run["elapsed_s"], 1),
            "by_outcome": dict(by_outcome),
            "by_kind_and_outcome": dict(sorted(counts.items())),
        },
        "samples": run["samples"],
    }
    shots = run["snapshots"]
    if {"start", "half", "end"} <= set(shots):
        result["growth"] = {
            "over the second half": growth(shots["half"], shots["end"], a.top),
            "over the whole run": growth(shots["start"], shots["end"], a.top),
        }
    report(result)
    out = OUT / f"memprobe-{label}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

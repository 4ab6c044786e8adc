"""How fast a gateway follows its upstreams file, and what the overflow rule costs the scheduler.

    .venv/bin/python loadtest/upstreams_bench.py [--repeats 5] [--health-interval 2]

Starts three ``loadtest/fake_upstream.py`` processes and one ``python -m gateway
--upstreams-file`` process (all on 127.0.0.1, stopped at the end), then, ``--repeats`` times:

- **add, mtime**: appends a server to the file; seconds until ``/ready`` says it is up
  (bounded by one health interval: the file's mtime is polled that often);
- **add, SIGHUP**: the same, signalling the gateway;
- **remove, SIGHUP**: an idle server taken out of the file; seconds until its metric series
  are gone from ``/metrics`` (drained, with nothing in flight, and forgotten).

Then the pure scheduler: admit, dispatch and release rounds per second with two primary
windows, and with an overflow window besides (the rule runs whenever the primaries are full).
Prints the numbers and the machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.classes import DEFAULT_POLICIES, ClassTable
from gateway.scheduler import Dispatch, Scheduler, Ticket, Window
from loadtest.stack import ROOT, Server, describe_machine, fake_upstream

BASE_PORT = 19150


def listing(path: Path, urls: list[str]) -> None:
    path.write_text("".join(f'[[upstream]]\nurl = "{url}"\n' for url in urls))


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def forgotten(url: str, name: str) -> Callable[[], bool]:
    """Whether the gateway at ``url`` exports no series of upstream ``name`` any more."""
    return lambda: f'upstream="{name}"' not in get(url + "/metrics")


def seconds_until(check: Callable[[], bool], timeout_s: float = 30.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"not done after {timeout_s} s")
        time.sleep(0.005)
    return time.monotonic() - started


def follow(repeats: int, interval: float, out: Path) -> dict[str, list[float]]:
    fakes = [fake_upstream(BASE_PORT + i, out / f"fake-{i}.log", chunks=4) for i in range(3)]
    urls = [f.url for f in fakes]
    listed = out / "upstreams.toml"
    listing(listed, urls[:1])
    port = BASE_PORT + 10
    argv = [
        sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
        "--upstreams-file", str(listed), "--health-interval", str(interval),
        "--access-log", "off", "--log-level", "warning",
    ]  # fmt: skip
    gw = Server("gateway", argv, f"http://127.0.0.1:{port}", out / "gateway.log", group=False)
    times: dict[str, list[float]] = {"add, mtime": [], "add, SIGHUP": [], "remove, SIGHUP": []}
    try:
        for fake in fakes:
            fake.start().wait_ready("/health", 30)
        gw.start().wait_ready("/ready", 60)

        def states() -> dict[str, str]:
            ready = json.loads(get(gw.url + "/ready"))["upstreams"]
            return {name: u["state"] for name, u in ready.items()}

        def up(n: int) -> Callable[[], bool]:
            return lambda: list(states().values()) == ["up"] * n

        for _ in range(repeats):
            listing(listed, urls[:2])
            times["add, mtime"].append(seconds_until(up(2)))
            listing(listed, urls[:3])
            gw.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            times["add, SIGHUP"].append(seconds_until(up(3)))
            gone = urls[2].split("://", 1)[1]
            listing(listed, urls[:1])
            gw.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            times["remove, SIGHUP"].append(seconds_until(forgotten(gw.url, gone)))
            seconds_until(up(1))
            time.sleep(interval)  # let the next write get a new mtime the poll can see
    finally:
        gw.stop()
        for fake in fakes:
            fake.stop()
    return times


def scheduler_rate(overflow: bool, n: int = 50_000) -> float:
    classes = ClassTable(DEFAULT_POLICIES)
    windows = [Window("a", 8), Window("b", 8)] + (
        [Window("c", 8, overflow=True)] if overflow else []
    )
    s = Scheduler(classes, 100_000, windows)
    running: list[Ticket] = []
    started = time.perf_counter()
    for i in range(n):
        now = i * 0.001
        policy = classes.ordered[i % len(classes.ordered)]
        s.admit(Ticket("x", policy, now, now + 1e9, now + 1e9), now)
        running += [d.ticket for d in s.dispatch(now) if isinstance(d, Dispatch)]
        if len(running) > 12:  # keep the primaries full, so the overflow rule runs
            s.release(running.pop(0), now)
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--health-interval", type=float, default=2.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = follow(a.repeats, a.health_interval, Path(tmp))
    print(f"upstreams file, --health-interval {a.health_interval:g} s, {a.repeats} repeats:")
    for what, values in times.items():
        print(f"  {what:15} median {statistics.median(values):.3f} s, max {max(values):.3f} s")
    print("scheduler, admit+dispatch+release per second (best of 5):")
    for overflow in (False, True):
        rate = max(scheduler_rate(overflow) for _ in range(5))
        print(f"  {'with' if overflow else 'without'} an overflow window: {rate:,.0f}")
    print(f"machine: {describe_machine().markdown()}; run from {ROOT}")


if __name__ == "__main__":
    main()

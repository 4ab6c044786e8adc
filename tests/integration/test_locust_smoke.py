"""A short headless Locust run through the gateway in front of the real tiny-model vLLM.

Proves the load-test tooling works end to end: every task in the mix is requested, streams
report a time to first token, the CSV and HTML reports are written, and nothing fails except
possibly an SLA breach (the tiny model is fast, but the CPU is shared with whatever else runs
on the machine, so a rare late answer is tolerated; errors are not).
"""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path

from tests.vllm_server import OUTPUT, ROOT

MIX = {"sentiment": 3, "chat": 2, "summarize": 1, "translate": 1}  # no long batch work
STREAMED = ("chat", "summarize")
LOCUST_FAILURE_EXIT = 1  # --exit-code-on-error
RUN_S = 20
MAX_BREACH_SHARE = 0.2  # more late answers than this is not noise: something is slow


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


async def test_headless_locust_run_through_the_gateway(gateway: str) -> None:
    out = OUTPUT / "locust-smoke"
    out.mkdir(parents=True, exist_ok=True)
    prefix, html, log = out / "run", out / "report.html", out / "locust.log"
    for stale in (*out.glob("run_*.csv"), html):
        stale.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "locust",
        "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--host", gateway,
        "--headless", "-u", "4", "-r", "4", "-t", f"{RUN_S}s", "--stop-timeout", "15",
        "--mix", ",".join(f"{task}={weight}" for task, weight in MIX.items()),
        "--think-time", "0.2",
        "--csv", str(prefix), "--html", str(html),
        "--exit-code-on-error", str(LOCUST_FAILURE_EXIT),
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, stdout=sink, stderr=asyncio.subprocess.STDOUT
        )
        try:
            code = await asyncio.wait_for(process.wait(), RUN_S + 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise

    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert code in (0, LOCUST_FAILURE_EXIT), f"locust exited with {code}:\n{tail}"
    assert html.stat().st_size > 0
    stats = {(r["Type"], r["Name"]): r for r in _rows(Path(f"{prefix}_stats.csv"))}
    for task in MIX:
        row = stats.get(("POST", task))
        assert row is not None, f"no {task} requests:\n{tail}"
        assert int(row["Request Count"]) > 0, f"no {task} requests:\n{tail}"
        assert int(row["Failure Count"]) == 0, f"{task} requests failed:\n{tail}"
    for task in STREAMED:
        assert int(stats[("TTFT", task)]["Request Count"]) > 0, f"no TTFT for {task}"

    failures = _rows(Path(f"{prefix}_failures.csv"))
    assert all(f["Method"] == "SLA breach" for f in failures), f"unexpected failures: {failures}"
    if code == LOCUST_FAILURE_EXIT:
        assert failures, f"locust failed without a recorded failure:\n{tail}"
    answered = sum(int(stats[("POST", task)]["Request Count"]) for task in MIX)
    breaches = sum(int(f["Occurrences"]) for f in failures)
    assert breaches <= MAX_BREACH_SHARE * answered, f"{breaches} SLA breaches in {answered}"

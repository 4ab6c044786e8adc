"""The status page rendered by a real browser (Debian's headless Chromium) against a live gateway.

The browser runs the page's own script: it fetches /status.json from the gateway (in front of
the fake vLLM) and builds the tables, so the dumped DOM holds the live numbers. A screenshot
goes to test-output/status.png for a human to look at. Chromium missing is a failure: the
observability tier needs it (./launch/test.sh installs it).
"""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from pathlib import Path

import httpx

from gateway.upstreams import upstream_name
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
USER = [{"role": "user", "content": "I love this phone"}]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), (
        "Chromium is missing: apt-get install -y chromium (./launch/test.sh does this)"
    )
    return path


async def run_chromium(user_data: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(  # async: the gateway shares this loop
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        "--virtual-time-budget=5000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Cells(HTMLParser):
    """``cells[(row, field)]`` = text of each ``<td data-field>`` inside a ``<tr data-row>``."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.classes: dict[tuple[str, str], str] = {}
        self.ids: dict[str, str] = {}
        self._row: str | None = None
        self._cell: tuple[str, str] | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self._row = a.get("data-row")
        elif tag == "td" and self._row is not None and a.get("data-field"):
            self._cell = (self._row, a["data-field"] or "")
            self.cells[self._cell] = ""
            self.classes[self._cell] = a.get("class") or ""
        if a.get("id"):
            self._id = a["id"]
            self.ids[self._id or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None
        self._id = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.cells[self._cell] += data
        if self._id is not None:
            self.ids[self._id] += data


async def test_chromium_renders_the_live_status(
    start_gateway: GatewayFactory, fake: FakeVllm, tmp_path: Path
) -> None:
    fake.behaviour.reply = "one two three four five"
    fake.behaviour.chunk_delay_s = 0.02
    async with (
        start_gateway(window=1, health_interval_s=0.1) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        for _ in range(4):
            r = await c.post("/v1/chat/completions", json={"model": "sentiment", "messages": USER})
            assert r.status_code == 200
        for _ in range(2):
            r = await c.post(
                "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": USER}
            )
            assert r.status_code == 200
        fake.behaviour.first_token_delay_s = 60  # one batch request runs, two wait
        pending = [
            asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
            )
            for _ in range(3)
        ]
        async with asyncio.timeout(5):
            while (await c.get("/status.json")).json()["queue"]["queued"] < 2:
                await asyncio.sleep(0.02)
        try:
            dom = await run_chromium(tmp_path / "profile-dom", "--dump-dom", f"{url}/status")
            OUTPUT.mkdir(exist_ok=True)
            shot = OUTPUT / "status.png"
            shot.unlink(missing_ok=True)
            await run_chromium(
                tmp_path / "profile-shot",
                f"--screenshot={shot}",
                "--window-size=1200,900",
                f"{url}/status",
            )
        finally:
            for call in pending:
                call.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    page = Cells()
    page.feed(dom)
    cells = page.cells
    assert page.ids["state"] == "live", page.ids.get("state")
    assert cells[("queue:batch", "queue-depth")] == "2"
    assert cells[("queue:realtime", "queue-depth")] == "0"
    assert cells[("queue:batch", "capacity")] == "256"
    name = upstream_name(fake.url)
    assert cells[(f"upstream:{name}", "state")] == "up"
    assert page.classes[(f"upstream:{name}", "state")] == "ok"
    assert cells[(f"upstream:{name}", "inflight")] == "1 / 1"
    for task in ("sentiment", "chat", "code", "summarize", "translate", "batch", "assist"):
        assert cells[(f"task:{task}", "task")] == task
    assert cells[("task:sentiment", "requests")] == "4"
    assert cells[("task:chat", "requests")] == "2"
    assert cells[("task:sentiment", "latency-p95")].endswith("ms")
    assert page.classes[("task:sentiment", "latency-p95")] == "ok"  # green: within its SLA
    assert page.classes[("task:chat", "ttft-p95")] == "ok"
    assert page.classes[("task:code", "latency-p95")] == "idle"  # no traffic: neither colour
    assert cells[("task:sentiment", "sla-latency")] == "2.00 s"

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"status page screenshot: {shot}")

"""The status page rendered by a real browser (Debian's headless Chromium) against a live gateway.

The browser runs the page's own script: it fetches /status.json from the gateway (in front of
the fake vLLM) and builds the tables, so the dumped DOM holds the live numbers. A screenshot
goes to test-output/status.png for a human to look at. Chromium missing is a failure: the
observability tier needs it (./launch/test.sh installs it).
"""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser
from pathlib import Path

import httpx

from gateway.history import History
from gateway.settings import Settings
from gateway.upstreams import upstream_name
from tests.browser import browser, chromium
from tests.fake_vllm import FakeVllm
from tests.servers import running_gateway
from tests.unit.conftest import GatewayFactory
from tests.unit.test_status import small_batch_queue

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
USER = [{"role": "user", "content": "I love this phone"}]


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


async def test_chromium_draws_the_last_minutes_after_a_burst(
    fake: FakeVllm, tmp_path: Path
) -> None:
    """A burst through a one-slot upstream (batch queues and overflows, realtime cuts in),
    then /status in Chromium: its charts show the queue, the refusals, the window and each
    task's p95 against its SLA."""
    fake.behaviour.reply = "one two three four five six"
    fake.behaviour.chunk_delay_s = 0.1
    settings = Settings(
        upstreams=(fake.url,),
        window=1,
        window_mode="fixed",
        health_interval_s=0.1,
        access_log=False,
    )
    history = History(interval_s=0.2, span_s=30.0, trailing_s=10.0)
    async with (
        running_gateway(settings, small_batch_queue(), history=history) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):

        async def ask(task: str, stream: bool = False) -> int:
            body = {"model": task, "messages": USER, "stream": stream}
            return (await c.post("/v1/chat/completions", json=body)).status_code

        batch = [asyncio.create_task(ask("batch")) for _ in range(6)]
        async with asyncio.timeout(10):  # one runs, two wait (the class's bound), three refused
            while history.since(None)[-1:] == [] or history.since(None)[-1]["queue"]["batch"] < 2:
                await asyncio.sleep(0.02)
        urgent = [ask("sentiment") for _ in range(4)] + [ask("chat", stream=True) for _ in range(2)]
        statuses = await asyncio.gather(*batch, *urgent)
        assert sorted(statuses[:6]) == [200, 200, 200, 429, 429, 429]
        assert statuses[6:] == [200] * 6
        ended = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):  # a point taken after the burst, so its rates are in
            while not history.since(ended):
                await asyncio.sleep(0.02)

        async with browser(tmp_path / "profile") as page:
            await page.goto(f"{url}/status")
            await page.wait_for("document.querySelector('svg[data-chart=\"task:sentiment\"] path')")
            charts = await page.evaluate(
                """Object.fromEntries([...document.querySelectorAll("svg[data-chart]")].map(svg =>
                    [svg.dataset.chart, {
                      series: Object.fromEntries([...svg.querySelectorAll("path[data-series]")]
                        .map(p => [p.dataset.series, [Number(p.dataset.points), Number(p.dataset.max)]])),
                      refs: [...svg.querySelectorAll("line[data-ref]")].map(l => l.dataset.ref),
                      empty: svg.querySelector("text.empty")?.textContent || null,
                    }]))"""
            )
            OUTPUT.mkdir(exist_ok=True)
            shot = OUTPUT / "status-charts.png"
            await page.screenshot(shot)
            assert page.errors == []

    name = upstream_name(fake.url)
    queue = charts["queue"]["series"]
    assert set(queue) == {"realtime", "interactive", "standard", "batch", "background"}
    assert queue["batch"][1] >= 2  # its bound, reached (plus a batch request paused for realtime)
    refusals = charts["refusals"]["series"]
    assert refusals["class_queue_full"][1] > 0  # per minute
    upstream = charts[f"upstream:{name}"]["series"]
    assert upstream["in flight"][1] == 1
    assert upstream["window"][1] == 1
    sentiment = charts["task:sentiment"]
    assert sentiment["series"]["p95 latency"][0] > 0
    assert sentiment["refs"] == ["SLA", "TTFT SLA"]
    assert charts["task:chat"]["series"]["p95 TTFT"][0] > 0
    assert charts["task:code"]["empty"] == "no answers in this span"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"status charts screenshot: {shot}")

"""A real headless Chromium that tests drive: click, type, wait for the page, take screenshots.

Debian's Chromium (as the status page's ``--dump-dom`` test uses), started with a DevTools
port and spoken to over the DevTools protocol (a websocket, with aiohttp, which the fake
already needs), in the test's own event loop, next to the gateway it browses. Waits are
conditions evaluated in the page (``wait_for``), never fixed sleeps. Chromium missing or
failing to start is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), (
        "Chromium is missing: apt-get install -y chromium (./launch/test.sh does this)"
    )
    return path


#: Flags for a quiet, isolated headless Chromium on a CI-like machine.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class Page:
    """One tab, driven over the DevTools protocol. ``errors`` collects the page's uncaught
    JavaScript exceptions, so a test can insist there were none."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = iter(range(1, 1 << 30))
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        id_ = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[id_] = future
        await self._ws.send_str(json.dumps({"id": id_, "method": method, "params": params}))
        return await asyncio.wait_for(future, 60)

    def next_event(self, name: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``name`` event: take it before causing the event."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(future)
        return future

    async def goto(self, url: str) -> None:
        loaded = self.next_event("Page.loadEventFired")
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 30)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (a promise is awaited)."""
        reply = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise AssertionError(
                f"page error: {details.get('exception', {}).get('description') or details}"
            )
        return reply["result"].get("value")

    async def wait_for(self, predicate: str, timeout_s: float = 15.0) -> Any:
        """Wait until the JavaScript expression ``predicate`` is truthy in the page (checked
        every animation frame); its value. Fails with the predicate after ``timeout_s``."""
        script = f"""new Promise((resolve, reject) => {{
            const until = performance.now() + {timeout_s * 1000};
            const check = () => {{
                let value;
                try {{ value = ({predicate}); }} catch (e) {{ value = undefined; }}
                if (value) return resolve(value);
                if (performance.now() > until) return reject(new Error("timed out waiting for: " + {json.dumps(predicate)}));
                requestAnimationFrame(check);
            }};
            check();
        }})"""
        return await self.evaluate(script)

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def fill(self, selector: str, value: str) -> None:
        """Set a field's value as typing would (with its input and change events)."""
        await self.evaluate(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.value = {json.dumps(value)};
            e.dispatchEvent(new Event("input", {{bubbles: true}}));
            e.dispatchEvent(new Event("change", {{bubbles: true}})); }})()"""
        )

    async def screenshot(self, path: Path, width: int = 1200) -> None:
        """The whole page, ``width`` CSS pixels wide, as a PNG."""
        height = await self.evaluate("document.documentElement.scrollHeight")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._calls.pop(data["id"])
                if "error" in data:
                    future.set_exception(AssertionError(f"DevTools: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
                continue
            method = data.get("method", "")
            if method == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.errors.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )
            for future in self._waiters.pop(method, []):
                if not future.done():
                    future.set_result(data.get("params", {}))


@asynccontextmanager
async def browser(profile: Path, width: int = 1200, height: int = 900) -> AsyncIterator[Page]:
    """Start Chromium with a fresh profile in ``profile``; yield its one tab; stop it after."""
    process = await asyncio.create_subprocess_exec(
        chromium(),
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    said: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        try:
            port = await asyncio.wait_for(_devtools_port(process.stderr, said), 60)
        except TimeoutError:
            raise AssertionError("Chromium did not start:\n" + "\n".join(said[-20:])) from None
        # Keep reading its stderr so Chromium never blocks on a full pipe.
        drain = asyncio.create_task(_drain(process.stderr, said))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            pages = [t for t in targets if t["type"] == "page"]
            assert pages, f"Chromium has no tab: {targets}"
            ws = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(ws)
            try:
                for domain in ("Page", "Runtime"):
                    await page.call(f"{domain}.enable")
                yield page
            finally:
                await page.close()
    finally:
        if process.returncode is None:
            process.terminate()
        with suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()
        if drain is not None:
            drain.cancel()
            with suppress(asyncio.CancelledError):
                await drain


async def _devtools_port(stderr: asyncio.StreamReader, said: list[str]) -> int:
    while line := (await stderr.readline()).decode(errors="replace"):
        said.append(line.rstrip())
        if found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            return int(found.group(1))
    raise AssertionError("Chromium exited before listening:\n" + "\n".join(said[-20:]))


async def _drain(stderr: asyncio.StreamReader, said: list[str]) -> None:
    while line := await stderr.readline():
        said.append(line.decode(errors="replace").rstrip())
        del said[:-50]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

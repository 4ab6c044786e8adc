"""./launch/serve.sh keeps serving when its vLLM dies (issue 9, item 10).

serve.sh runs as a user runs it: its own process, the tiny model (the folder this tier was
given, which is what ``MODEL=tiny`` resolves to under test.sh), free ports on 127.0.0.1, and
its logs and PID files in ``test-output/serve-sh/``. The vLLM it started is SIGKILLed in the
middle of a stream, as the OOM killer would do it. The gateway must stay up, end the stream
with an in-band error, answer 503 with ``Retry-After`` while it has no upstream, and serve
again once serve.sh has restarted vLLM, with nobody touching anything. SIGTERM to serve.sh
then stops the gateway and the new vLLM.

Only processes this test started are signalled, by PID: serve.sh, and the vLLM whose PID
serve.sh recorded (checked to be vLLM's API server on our port before it is killed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import httpx

from tests.integration.test_faults import SHORT, Stream, until_status
from tests.vllm_server import OUTPUT, ROOT, SHARED_CPU, free_port, model_dir

LOGS = OUTPUT / "serve-sh"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
START_S = 600  # vLLM's first start on two busy cores, compile cache cold
RECOVER_S = 240  # kill to /ready 200 again: back-off, stop, restart, the gateway's breaker


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, process group) from /proc, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    return fields[0], int(fields[2])


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def group_alive(pgid: int) -> bool:
    """Whether any live process is left in the group (vLLM's engine may outlive its API
    server)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None and state[1] == pgid and state[0] not in ("Z", "X"):
                return True
    return False


def cmdline(pid: int) -> list[str]:
    with suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return []


def recorded_pid(name: str) -> int | None:
    """The PID serve.sh wrote to ``LOGS/name``, if it is there."""
    try:
        return int((LOGS / name).read_text().strip())
    except (FileNotFoundError, ValueError):  # not there, or being written
        return None


def serve_log() -> str:
    return (LOGS / "serve.log").read_text(errors="replace")


def tail(path: Path, lines: int = 30) -> str:
    with suppress(FileNotFoundError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class ServeSh:
    """``./launch/serve.sh`` in its own session, its output in ``LOGS/serve.log``."""

    def __init__(self, vllm_port: int, gateway_port: int) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        for name in ("vllm.pid", "gateway.pid"):
            (LOGS / name).unlink(missing_ok=True)
        env = {
            k: v for k, v in os.environ.items() if k != "UPSTREAMS" and not k.startswith("GATEWAY_")
        }
        env.update(SHARED_CPU)  # other vLLM servers of this tier may be running
        env.update(
            MODEL=model_dir("QWEN_GATEWAY_TINY_MODEL", "tiny-qwen2"),
            VLLM_PORT=str(vllm_port),
            GATEWAY_PORT=str(gateway_port),
            MAX_NUM_SEQS="4",
            VLLM_EXTRA_ARGS="--enforce-eager",
            VLLM_CPU_KVCACHE_SPACE="1",
            LOG_DIR=str(LOGS),
        )
        self.vllm_port = vllm_port
        self.started_at = time.monotonic()
        self.first_ready_s = 0.0  # serve.sh's start to the gateway's first /ready 200
        self.vllm_pids: set[int] = set()  # every vLLM serve.sh was seen to run
        with (LOGS / "serve.log").open("wb") as out:
            self.process = subprocess.Popen(
                [str(ROOT / "launch" / "serve.sh")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # signals reach it only from this test, by PID
            )

    def check_running(self) -> None:
        code = self.process.poll()
        assert code is None, f"serve.sh exited with {code}:\n{tail(LOGS / 'serve.log')}"

    def vllm_pid(self) -> int | None:
        """The vLLM API server serve.sh recorded, once it is that (not vllm.sh before exec)."""
        pid = recorded_pid("vllm.pid")
        if pid is None:
            return None
        args = cmdline(pid)
        if VLLM_MODULE not in args or str(self.vllm_port) not in args:
            return None
        self.vllm_pids.add(pid)
        return pid

    async def new_vllm(self, other_than: int | None, timeout_s: float) -> int:
        """Wait for serve.sh to record a vLLM that is not ``other_than``."""
        async with asyncio.timeout(timeout_s):
            while True:
                self.check_running()
                pid = self.vllm_pid()
                if pid is not None and pid != other_than:
                    return pid
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM serve.sh; then SIGKILL whatever it started that is left (a serve.sh that
        failed the test may not have stopped it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=90)
        for pgid in (self.process.pid, *self.vllm_pids):  # serve.sh's group holds the gateway
            if group_alive(pgid):
                with suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        self.process.wait(timeout=10)


@asynccontextmanager
async def serve_sh() -> AsyncIterator[tuple[ServeSh, httpx.AsyncClient]]:
    """serve.sh started and its gateway ready; a client for that gateway."""
    gateway_port = free_port()
    vllm_port = free_port()
    while vllm_port == gateway_port:
        vllm_port = free_port()
    serve = ServeSh(vllm_port, gateway_port)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway_port}", timeout=60
        ) as client:
            async with asyncio.timeout(START_S):
                while True:
                    serve.check_running()
                    with suppress(httpx.TransportError):
                        if (await client.get("/ready")).status_code == 200:
                            serve.first_ready_s = time.monotonic() - serve.started_at
                            break
                    await asyncio.sleep(1)
            yield serve, client
    finally:
        serve.stop()


async def test_serve_sh_restarts_vllm_and_keeps_the_gateway_up() -> None:
    async with serve_sh() as (serve, c):
        gateway = recorded_pid("gateway.pid")
        assert gateway is not None
        assert alive(gateway)
        assert "gateway" in cmdline(gateway)
        first = await serve.new_vllm(None, timeout_s=10)
        assert first not in (serve.process.pid, gateway)
        assert (process_state(first) or ("", 0))[1] == first  # it leads its own process group

        # A long stream is running when vLLM is killed outright.
        stream = Stream(c)
        async with asyncio.timeout(60):
            await stream.started.wait()
        assert not stream.task.done(), stream.lines[-3:]
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()

        async with asyncio.timeout(30):
            await stream.task
        error_after_s = stream.ended_at - killed_at
        assert stream.lines[-1] == "data: [DONE]", stream.lines[-3:]
        assert stream.lines[-2].startswith("data: "), stream.lines[-3:]
        error = json.loads(stream.lines[-2].removeprefix("data: "))["error"]
        assert error["type"] == "upstream_error", error
        assert error_after_s < 2, error_after_s

        # The gateway stays up and says it has no upstream.
        assert (await c.get("/health")).status_code == 200
        await until_status(c, "/ready", 503, timeout_s=10)
        r = await c.post("/v1/chat/completions", json=SHORT)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1, r.headers
        assert set(r.json()) == {"error"}, r.text
        envelope = r.json()["error"]
        assert set(envelope) == {"message", "type", "param", "code"}, envelope
        assert envelope["type"] == "service_unavailable", envelope
        assert envelope["code"] in ("no_upstream", "upstream_unavailable"), envelope

        # serve.sh starts another vLLM by itself, and the gateway takes it up.
        second = await serve.new_vllm(first, timeout_s=RECOVER_S)
        assert not group_alive(first)  # the old engine went with its API server
        try:
            async with asyncio.timeout(RECOVER_S - (time.monotonic() - killed_at)):
                while (await c.get("/ready")).status_code != 200:
                    serve.check_running()
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise AssertionError(
                f"/ready was not 200 within {RECOVER_S} s of the kill; the first start took "
                f"{serve.first_ready_s:.0f} s, load average {os.getloadavg()}:\n"
                f"{tail(LOGS / 'serve.log')}"
            ) from None
        ready_after_s = time.monotonic() - killed_at
        r = await c.post("/v1/chat/completions", json=SHORT)
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        assert recorded_pid("gateway.pid") == gateway
        assert alive(gateway)  # the very same gateway process served throughout
        assert "vLLM exited (code 137); restarting in 2 s" in serve_log(), serve_log()

        # SIGTERM stops everything it started.
        serve.process.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert serve.process.wait(timeout=90) == 0, tail(LOGS / "serve.log")
        print(
            f"serve.sh: ready {serve.first_ready_s:.0f} s after its start; "
            f"in-band error {error_after_s:.2f} s after SIGKILL, /ready 200 again "
            f"after {ready_after_s:.1f} s, stopped {time.monotonic() - stopping:.1f} s after SIGTERM"
        )
        assert not alive(gateway)
        assert not group_alive(second)
        assert not (LOGS / "vllm.pid").exists()
        assert not (LOGS / "gateway.pid").exists()

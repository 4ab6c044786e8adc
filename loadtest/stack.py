"""Processes the SLO benchmark runs and measures: vLLM, the gateway, and the machine itself.

vLLM starts through ``launch/vllm.sh`` in its own process group (it forks an engine core and
a worker) and is stopped by signalling that group. The gateway is a plain child process, so
its CPU time can be read from ``/proc/PID/stat``. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Server:
    """A child process serving HTTP on 127.0.0.1, with a log file and a readiness URL."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        log_path: Path,
        group: bool,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.log_path = log_path
        self._argv = argv
        self._group = group  # own process group, stopped as a whole (vLLM's engine children)
        self._env = {**os.environ, **env} if env else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        port = int(self.url.rsplit(":", 1)[1])
        if not port_is_free(port):
            # Otherwise readiness checks would pass against whatever already listens there.
            raise RuntimeError(f"port {port} is already in use; is an earlier {self.name} left?")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self._argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self._env,
                start_new_session=self._group,
            )
        return self

    def wait_ready(self, path: str, timeout_s: float) -> float:
        """Poll ``url + path`` until it answers 200; return the seconds it took."""
        assert self.process is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200 and self.process.poll() is None:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM (the whole group for vLLM), up to 30 s to exit, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        pid = self.process.pid
        kill = (lambda sig: os.killpg(pid, sig)) if self._group else self.process.send_signal
        try:
            kill(signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill(signal.SIGKILL)
            self.process.wait(timeout=10)
        finally:
            if self._group:  # whatever happened above: the engine may outlive the server
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers bind (uvicorn and vLLM set SO_REUSEADDR): a closed connection of the
        # previous run in TIME_WAIT must not count as the port being taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def vllm_server(
    model: str, port: int, max_num_seqs: int, log_path: Path, env: Mapping[str, str], *extra: str
) -> Server:
    """vLLM through launch/vllm.sh; ``env`` adds e.g. VLLM_CPU_KVCACHE_SPACE."""
    argv = [str(ROOT / "launch" / "vllm.sh"), model, str(port), str(max_num_seqs), *extra]
    return Server("vLLM", argv, f"http://127.0.0.1:{port}", log_path, group=True, env=env)


def gateway_server(
    port: int,
    upstream: str,
    window: int,
    log_path: Path,
    tasks: Path | None = None,
    keys: Path | None = None,
    launcher: list[str] | None = None,
    extra: Sequence[str] = (),
) -> Server:
    """The gateway as ``python -m gateway``, or under ``launcher`` (e.g. a memory probe's
    ``[python, loadtest/memprobe.py, serve, --]``), which gets the same arguments; ``extra``
    are more of them (e.g. ``["--window-mode", "fixed"]``)."""
    argv = [
        *(launcher or [sys.executable, "-m", "gateway"]),
        "--host", "127.0.0.1", "--port", str(port),
        "--upstreams", upstream, "--window", str(window),
        "--access-log", "off", "--log-level", "warning",
    ]  # fmt: skip
    if tasks is not None:
        argv += ["--tasks", str(tasks)]
    if keys is not None:
        argv += ["--keys", str(keys)]
    argv += extra
    return Server("gateway", argv, f"http://127.0.0.1:{port}", log_path, group=False)


def fake_upstream(
    port: int, log_path: Path, chunks: int, first_ms: float = 0.0, chunk_ms: float = 0.0
) -> Server:
    """``loadtest/fake_upstream.py``, paced when ``first_ms`` or ``chunk_ms`` is set."""
    argv = [
        sys.executable, str(ROOT / "loadtest" / "fake_upstream.py"), "--port", str(port),
        "--chunks", str(chunks), "--first-ms", str(first_ms), "--chunk-ms", str(chunk_ms),
    ]  # fmt: skip
    return Server("fake upstream", argv, f"http://127.0.0.1:{port}", log_path, group=False)


def sim_server(
    port: int, servers: int, preset: str, max_num_seqs: int, speed: float, log_path: Path
) -> Server:
    """``servers`` simulated vLLMs (loadtest/sim_vllm.py) on ports ``port`` and up, one
    process in its own group (stopped like vLLM)."""
    argv = [
        sys.executable, str(ROOT / "loadtest" / "sim_vllm.py"), "--port", str(port),
        "--servers", str(servers), "--preset", preset, "--max-num-seqs", str(max_num_seqs),
        "--speed", str(speed), "--model", f"sim-{preset}",
    ]  # fmt: skip
    return Server("simulated vLLM", argv, f"http://127.0.0.1:{port}", log_path, group=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat`` utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (busy time of every core)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


@dataclass(frozen=True, slots=True)
class Machine:
    nproc: int
    cpu_model: str
    ram_gib: float
    python: str
    vllm: str
    kernel: str

    def markdown(self) -> str:
        return (
            f"{self.nproc} CPUs ({self.cpu_model}), {self.ram_gib:.1f} GiB RAM, "
            f"Linux {self.kernel}, Python {self.python}, vLLM {self.vllm}"
        )


def describe_machine() -> Machine:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu_model=cpu_model,
        ram_gib=mem_kib / 1024 / 1024,
        python=platform.python_version(),
        vllm=vllm_version(),
        kernel=platform.release(),
    )


def source_state() -> dict[str, Any]:
    """The commit measured, and which gateway files differed from it (others edit them)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "gateway_changes": git("status", "--short", "--", "gateway").splitlines(),
    }


def vllm_version() -> str:
    python = os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"

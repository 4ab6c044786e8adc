"""A real vLLM server for the integration and end-to-end tiers, started through launch/vllm.sh.

The server runs in its own process group (vLLM starts an engine process) and is stopped by
signalling that group, so no engine is left behind. A server that cannot start fails the
tier with the tail of its log: these tiers are never skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output"


def model_dir(env: str, name: str) -> str:
    """The model folder test.sh built; a missing one is an error, not a skip."""
    cache = Path(os.environ.get("QWEN_GATEWAY_CACHE", Path.home() / ".cache" / "qwen-gateway"))
    path = Path(os.environ.get(env, cache / "models" / name))
    if not (path / "BUILD.json").exists():
        raise RuntimeError(f"no model at {path}; run ./launch/test.sh, which builds it")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: For servers that share the machine with other vLLM servers. vLLM's CPU build pins its
#: worker to core 0 by default (keeping the last core for its API server); two or three
#: servers pinned to the same core starve each other: measured here, a server starting next
#: to a busy one sat 6 minutes in start-up, and a first token took over 1.5 s. One unpinned
#: compute thread each lets the kernel spread them.
SHARED_CPU = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


class VllmServer:
    def __init__(
        self,
        model: str,
        max_num_seqs: int,
        name: str,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``extra`` are more vLLM flags; ``env`` more environment (e.g. :data:`SHARED_CPU`)."""
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = OUTPUT / f"vllm-{name}.log"
        self._extra = extra
        self._env = {**os.environ, **(env or {})}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmServer:
        OUTPUT.mkdir(exist_ok=True)
        log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [
                str(ROOT / "launch" / "vllm.sh"),
                self.model,
                str(self.port),
                str(self.max_num_seqs),
                *self._extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,  # its own process group, stopped as a whole
        )
        return self

    def wait_ready(self, timeout_s: float = 600) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM was not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        pgid = self._process.pid
        os.killpg(pgid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self._process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # the engine may outlive the API server
            os.killpg(pgid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        """Sum of a vLLM metric over its series (e.g. ``vllm:num_requests_running``)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"vLLM exports no {name}")
        return total

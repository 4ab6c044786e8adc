"""Real vLLM (CPU build) on the tiny random-weight Qwen2, started once per session.

Two servers start side by side: ``serial`` runs one sequence at a time (``--max-num-seqs 1``)
so requests queue inside vLLM and its own priority order is observable; ``main`` runs four.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from gateway.config import Config
from gateway.settings import Settings
from tests.servers import running_gateway
from tests.vllm_server import SHARED_CPU, VllmServer, model_dir

GatewayFactory = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, VllmServer]]:
    model = model_dir("QWEN_GATEWAY_TINY_MODEL", "tiny-qwen2")
    started = {
        "serial": VllmServer(model, 1, "tiny-serial", "--enforce-eager", env=SHARED_CPU).start(),
        "main": VllmServer(model, 4, "tiny-main", "--enforce-eager", env=SHARED_CPU).start(),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="session")
def vllm(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["main"]


@pytest.fixture(scope="session")
def vllm_serial(servers: dict[str, VllmServer]) -> VllmServer:
    return servers["serial"]


@pytest.fixture
def start_gateway() -> Callable[..., AbstractAsyncContextManager[str]]:
    """``async with start_gateway(server, window=8) as url`` (window defaults to max-num-seqs,
    held fixed: these tests count slots; pass ``window_mode="adaptive"`` to size it)."""

    def start(
        server: VllmServer, config: Config | None = None, **changes: object
    ) -> AbstractAsyncContextManager[str]:
        base: dict[str, object] = {
            "upstreams": (server.url,),
            "window": server.max_num_seqs,
            "window_mode": "fixed",
            "health_interval_s": 0.5,
            "access_log": False,
        }
        return running_gateway(Settings(**{**base, **changes}), config)  # type: ignore[arg-type]

    return start


@pytest.fixture
async def gateway(vllm: VllmServer, start_gateway: GatewayFactory) -> AsyncIterator[str]:
    async with start_gateway(vllm) as url:
        yield url

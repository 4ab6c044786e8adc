"""The real default model (Qwen2.5-Coder-0.5B-Instruct) on vLLM's CPU build, once per session.

Same flags as ./launch/serve.sh except ``--enforce-eager``: this vLLM build recompiles its
graphs on every start (~100 s here), and the end-to-end claims are about answers and
scheduling, not the last 15% of throughput.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.settings import Settings
from tests.servers import running_gateway
from tests.vllm_server import VllmServer, model_dir

MAX_NUM_SEQS = 8  # as ./launch/serve.sh


@pytest.fixture(scope="session")
def vllm() -> Iterator[VllmServer]:
    server = VllmServer(
        model_dir("QWEN_GATEWAY_DEFAULT_MODEL", "qwen2.5-coder-0.5b-instruct"),
        MAX_NUM_SEQS,
        "default",
        "--enforce-eager",
    ).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def gateway(vllm: VllmServer) -> AsyncIterator[str]:
    settings = Settings(
        upstreams=(vllm.url,),
        window=MAX_NUM_SEQS,
        window_mode="fixed",  # the headroom test counts slots
        health_interval_s=0.5,
        access_log=False,
    )
    async with running_gateway(settings) as url:
        yield url

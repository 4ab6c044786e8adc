from __future__ import annotations

import asyncio
import gc
import logging

import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.__main__ import GatewayServer, listen_host
from gateway.shutdown import Drain


def test_without_keys_only_loopback_is_served_and_it_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert listen_host("0.0.0.0", keys_enabled=False) == "127.0.0.1"
        assert listen_host("127.0.0.1", keys_enabled=False) == "127.0.0.1"
    assert "no API keys configured: listening on 127.0.0.1 only, not 0.0.0.0" in caplog.text
    assert "serving local clients on 127.0.0.1 only" in caplog.text


def test_with_keys_the_configured_host_is_used() -> None:
    assert listen_host("0.0.0.0", keys_enabled=True) == "0.0.0.0"


async def test_the_server_freezes_the_start_up_heap_once_started() -> None:
    """Full collections then skip the libraries and the runtime (the p99 stalls they caused)."""
    server = GatewayServer(
        uvicorn.Config(Starlette(), host="127.0.0.1", port=0, lifespan="off", log_level="error"),
        Drain(1.0),
    )
    gc.unfreeze()
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0
    finally:
        server.should_exit = True
        await serving
        gc.unfreeze()  # this test process goes on making and dropping apps

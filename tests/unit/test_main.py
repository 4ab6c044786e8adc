from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.__main__ import GatewayServer, HttpProtocol, build_server, listen_host
from gateway.settings import Settings
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


def test_access_lines_are_encoded_and_written_off_the_calling_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event loop only enqueues an access record; a listener thread encodes and writes."""
    import io
    import json
    import threading

    from prometheus_client import CollectorRegistry

    from gateway.__main__ import configure_logging
    from gateway.exchange import Exchange, record
    from gateway.metrics import Metrics

    writers: list[str] = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            writers.append(threading.current_thread().name)
            return super().write(text)

    out = Out()
    monkeypatch.setattr("sys.stdout", out)
    metrics = Metrics(CollectorRegistry(), [("chat", "interactive")], ["interactive"], ["u"])
    with configure_logging("warning"):
        record(
            Exchange("r1", 0.0, task="chat", priority_class="interactive"), metrics, 1.0, log=True
        )
    line = json.loads(out.getvalue())
    assert line["request_id"] == "r1"
    assert writers
    assert threading.current_thread().name not in writers


def _protocols() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is HttpProtocol)


async def test_a_connection_the_client_resets_is_let_go_at_once() -> None:
    """uvicorn keeps a reset connection's protocol, and its last request, until the keep-alive
    timeout (30 s) passes; the gateway's protocol lets it go when it is lost (issue 16)."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    settings = Settings(port=0, log_level="error")
    server = build_server(app, settings, "127.0.0.1", Drain(1.0))
    server.config.lifespan = "off"
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        before = _protocols()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert (await reader.readuntil(b"hello")).startswith(b"HTTP/1.1 200")
        assert _protocols() == before + 1  # answered, kept alive for the next request
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # with linger 0: a reset, as a client that gives up sends
        async with asyncio.timeout(5):
            while _protocols() > before:
                await asyncio.sleep(0.05)
    finally:
        server.should_exit = True
        await serving
        gc.unfreeze()

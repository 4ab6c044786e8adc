from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import Callable

import pytest

from gateway.errors import BadGateway
from gateway.outbound import Limits, UpstreamClient, UpstreamResponse
from tests.fake_vllm import Behaviour, FakeVllm

BODY = json.dumps({"model": "fake-qwen", "messages": [], "stream": True}).encode()


async def _reader_cut_off(
    fake: FakeVllm, cut: Callable[[UpstreamResponse], None]
) -> weakref.ref[UpstreamResponse]:
    """Open a stream, wait for an event that does not come, ``cut`` the response meanwhile (as the relay's
    deadline timer does), and return a weak reference to the response once it is dropped."""
    fake.behaviour = Behaviour(chunk_delay_s=30)  # the second event never comes by itself
    client = UpstreamClient()
    try:
        response = await client.post(
            f"{fake.url}/v1/chat/completions",
            BODY,
            {"Content-Type": "application/json"},
        )
        events = response.events()
        batch = await anext(events)  # the role chunk, and perhaps the first word with it
        if batch.count(b"\n\n") < 2:
            assert await anext(events)  # the first word; the next one comes 30 s later
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.05)  # the reader waits inside aiohttp for the next event
        cut(response)
        with pytest.raises(BadGateway):
            await waiting
        await events.aclose()
        gone = weakref.ref(response)
        del response, events, waiting
    finally:
        await client.close()
    gc.collect()
    return gone


async def test_an_aborted_stream_leaves_nothing_behind(fake: FakeVllm) -> None:
    """A deadline aborts a stream whose reader waits for the next event. aiohttp would wake
    the reader with its one module-level "Connection closed" exception, whose traceback then
    keeps the reader's frames and this response alive for good (issue 16)."""
    for _ in range(3):
        gone = await _reader_cut_off(fake, UpstreamResponse.abort)
        assert gone() is None, "the aborted response is still referenced"


async def test_a_shared_aiohttp_exception_does_not_keep_the_reader(fake: FakeVllm) -> None:
    """If aiohttp closes a response under a reader by itself, the reader gets the shared
    instance; the gateway drops its traceback when it turns it into its own error."""
    for _ in range(3):
        gone = await _reader_cut_off(fake, lambda r: r._response.close())
        assert gone() is None, "the response is kept by a shared exception's traceback"


async def test_a_connection_idle_past_the_keepalive_is_never_reused() -> None:
    """vLLM's server closes a keep-alive connection idle for 5 s. A request sent on it just
    as it closes gets no answer at all ("Server disconnected": a 503 for a batch request in a
    fresh-clone run). The pool drops idle connections before vLLM does: this server answers
    one request per connection and drops the next one unanswered, as that crossing does."""
    answered: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for served in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            if served == 1:
                break
            answered.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient(limits=Limits(keepalive_s=0.2))
    try:
        for _ in range(3):
            response = await client.post(f"http://127.0.0.1:{port}/v1/x", b"{}", {})
            assert response.status == 200
            assert await response.read() == b"ok"
            await asyncio.sleep(0.3)  # idle past the pool's keep-alive (the time under test)
        assert len(answered) == 3
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert Limits().keepalive_s < 5  # below vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE

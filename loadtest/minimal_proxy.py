"""The reference row of the overhead benchmark: the least a Starlette proxy can do.

    python loadtest/minimal_proxy.py --port 19013 --upstream http://127.0.0.1:19010

``POST /v1/chat/completions`` is forwarded as it is to the upstream with one pooled aiohttp
session, and the answer comes back as it arrives (a stream chunk by chunk). No parsing, no
queue, no records: what any Python gateway on this stack pays at the least, measured in the
same run as the gateway so the two can be compared as a ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=512)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            yield {"session": session}

    async def forward(request: Request) -> Response:
        session: aiohttp.ClientSession = request.state.session
        body = await request.body()
        response = await session.post(
            upstream + request.url.path, data=body, headers={"Content-Type": "application/json"}
        )
        media = response.headers.get("Content-Type", "application/json")
        if media.startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for data in response.content.iter_any():
                        yield data
                finally:
                    response.release()

            return StreamingResponse(relay(), media_type="text/event-stream")
        raw = await response.read()
        return Response(raw, status_code=response.status, media_type=media)

    async def health(request: Request) -> Response:
        return Response(b"ok")

    routes = [
        Route("/v1/chat/completions", forward, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    uvicorn.run(
        build(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()

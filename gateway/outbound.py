"""All outbound HTTP: the gateway's one client of its upstreams (vLLM servers).

The client is aiohttp, chosen by measurement: behind a minimal Starlette proxy on this
2-core machine, aiohttp's client served 6,825 requests/s at 16 connections where httpx's
default transport served 546 and httpx over an aiohttp transport 2,803 (see the README's
overhead numbers for the gateway itself). Keeping every outbound call in this module keeps
that choice reversible.

Every call streams: a non-streaming client request is asked of vLLM as a stream too (and
put back together by :mod:`gateway.chunks`), so one rule bounds a silent upstream for both:
the read gap, the longest silence between two chunks, never the whole generation.

Failures are mapped to gateway errors here, once. aiohttp's timeouts are also connection
errors (``ServerTimeoutError`` subclasses both), so they are told apart first:

    connection refused / reset, or connect timeout -> UpstreamUnavailable (503, retryable)
    no response or no chunk within the read gap    -> UpstreamTimeout (504)
    a response that is not valid HTTP, or cut off  -> BadGateway (502)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.errors import BadGateway, GatewayError, ServiceUnavailable

#: An SSE event larger than this is not something vLLM sends; treat it as garbage.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class UpstreamUnavailable(ServiceUnavailable):
    """The upstream could not be reached; nothing was sent, so another one may be tried.
    ``refused``: nothing listens on its port (it is down or restarting, not failing)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message, code="upstream_unavailable")
        self.refused = refused


class UpstreamRejected(GatewayError):
    """vLLM refused the request as invalid (e.g. too long for the context): the client's 4xx."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(message, code=code or "upstream_rejected")
        self.status = status


def upstream_error(status: int, raw: bytes) -> GatewayError:
    """An upstream's non-200 answer as the client's error: its own 4xx, or ours for 5xx."""
    message, code = f"the upstream answered {status}", None
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    if 400 <= status < 500 and status != 429:
        return UpstreamRejected(status, message, code)
    if status in (429, 503):
        return ServiceUnavailable(f"the upstream is overloaded: {message}", code="upstream_busy")
    return BadGateway(f"the upstream failed: {message}", code="upstream_error")


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="upstream_timeout")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream timeouts in seconds, e.g. ``Timeouts(connect=2.0, read_gap=30.0)``.

    ``read_gap`` bounds the silence between two chunks of a streamed answer (a hung upstream),
    not the whole generation, which the request's own deadline bounds.
    """

    connect: float = 5.0
    read_gap: float = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Connection pool bounds, e.g. ``Limits(max_connections=256, per_upstream=128)``."""

    max_connections: int = 1024
    per_upstream: int = 512
    #: Below vLLM's own keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s). A request sent on a
    #: pooled connection just as vLLM closes it as idle gets no answer at all ("Server
    #: disconnected", a 503 in a fresh-clone test run), and it cannot be sent again blindly:
    #: the same error means an upstream that died mid-request. So the pool never reuses a
    #: connection idle for longer than this; aiohttp checks the idle time at reuse.
    keepalive_s: float = 3.0


class UpstreamResponse:
    """A response whose status and headers have arrived; the body has not been read."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream stopped answering") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise BadGateway(f"the upstream broke off its answer: {exc}") from _untraced(exc)
        finally:
            self._response.release()

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events in batches: each item is every complete event that had arrived
        (one or more, each with its trailing blank line). A burst of tokens then costs one
        step of this generator and one write to the client, not one per token."""
        content = self._response.content
        pending = b""
        while True:
            try:
                data = await content.readany()
            except TimeoutError as exc:  # before the connection errors: it is one too
                raise UpstreamTimeout("the upstream sent nothing within the read timeout") from exc
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise BadGateway(f"the upstream broke off the stream: {exc}") from _untraced(exc)
            if not data:
                return  # end of stream; an unfinished event is not an event
            if pending:
                data = pending + data
            end = data.rfind(b"\n\n")
            if end < 0:
                if len(data) > MAX_EVENT_BYTES:
                    raise BadGateway("the upstream sent an oversized event")
                pending = data
                continue
            pending = data[end + 2 :]
            yield data[: end + 2]

    def abort(self) -> None:
        """Drop the connection. vLLM notices the disconnect and aborts the request.

        A reader still waiting for the next event (a stream whose deadline passed) is woken
        with an exception of its own. Left to aiohttp, it would get aiohttp's one shared
        "Connection closed" instance (a module global), and every raise of that instance
        appends the reader's frames, and the response and buffers they hold, to its
        traceback, for the life of the process (issue 16).
        """
        content = self._response.content
        if content.exception() is None:
            content.set_exception(aiohttp.ClientConnectionError("the gateway closed the response"))
        self._response.close()

    def release(self) -> None:
        """Done with a fully read response: the connection may be reused."""
        self._response.release()


class UpstreamClient:
    """Pooled HTTP client for every upstream. Create it inside the running event loop."""

    def __init__(self, timeouts: Timeouts | None = None, limits: Limits | None = None) -> None:
        self.timeouts = timeouts = timeouts or Timeouts()
        limits = limits or Limits()
        self._gap = aiohttp.ClientTimeout(
            total=None, connect=timeouts.connect, sock_read=timeouts.read_gap
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=limits.max_connections,
                limit_per_host=limits.per_upstream,
                keepalive_timeout=limits.keepalive_s,
                ttl_dns_cache=300,
            ),
            timeout=self._gap,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        await self._session.close()

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send a (streaming) request and wait for the status line and headers.

        The read gap bounds the wait for the headers and then each chunk; the caller's
        deadline bounds the whole.
        """
        try:
            response = await self._session.post(url, data=body, headers=headers)
        except aiohttp.ConnectionTimeoutError as exc:  # nothing was sent: safe elsewhere
            raise UpstreamUnavailable(
                f"upstream {_origin(url)} did not accept a connection"
            ) from exc
        except TimeoutError as exc:  # ServerTimeoutError too: sent, and then silence
            raise UpstreamTimeout(f"upstream {_origin(url)} did not answer in time") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamUnavailable(f"upstream {_origin(url)} is unreachable: {exc}") from exc
        except aiohttp.ClientResponseError as exc:
            raise BadGateway(
                f"upstream {_origin(url)} sent an invalid response: {exc.message}"
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(
                f"upstream {_origin(url)} dropped the connection: {exc}"
            ) from exc
        return UpstreamResponse(response)

    async def post_json(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A small JSON call (tokenize, detokenize), bounded by the read gap and the caller's
        deadline. Any failure is UpstreamUnavailable: nothing was generated."""
        try:
            async with self._session.post(url, json=payload) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"upstream {_origin(url)} call failed: {exc!r}") from exc
        if response.status != 200 or not isinstance(body, dict):
            raise UpstreamUnavailable(f"upstream {_origin(url)} answered {response.status}")
        return body

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """A small GET (health, models, metrics). Errors become UpstreamUnavailable."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.get(url) as response:
                    return response.status, await response.read()
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            raise UpstreamUnavailable(
                f"upstream {_origin(url)} is unreachable: {exc!r}", refused=refused
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"upstream {_origin(url)} is unreachable: {exc!r}") from exc


def _untraced(exc: BaseException) -> BaseException:
    """``exc`` without its traceback. aiohttp raises some exception instances again and again
    (a module-level "Connection closed"); each raise appends frames to the instance's
    traceback, which would keep every request that hit it alive. The message says enough."""
    return exc.with_traceback(None)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"

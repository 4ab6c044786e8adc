"""All outbound HTTP: the gateway's one client of its upstreams (vLLM servers).

The client is aiohttp, chosen by measurement: behind a minimal Starlette proxy on this
2-core machine, aiohttp's client served 6,825 requests/s at 16 connections where httpx's
default transport served 546 and httpx over an aiohttp transport 2,803 (see the README's
overhead numbers for the gateway itself). Keeping every outbound call in this module keeps
that choice reversible.

Failures are mapped to gateway errors here, once:

    connection refused / reset before a response  -> UpstreamUnavailable (503, retryable)
    no response or no chunk within the read gap   -> UpstreamTimeout (504)
    a response that is not valid HTTP              -> BadGateway (502)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.errors import BadGateway, GatewayError, ServiceUnavailable

#: An SSE event larger than this is not something vLLM sends; treat it as garbage.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class UpstreamUnavailable(ServiceUnavailable):
    """The upstream could not be reached; nothing was sent, so another one may be tried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="upstream_unavailable")


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
    keepalive_s: float = 30.0


class UpstreamResponse:
    """A response whose status and headers have arrived; the body has not been read."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise BadGateway(f"the upstream broke off its answer: {exc}") from _untraced(exc)
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream stopped answering") from exc
        finally:
            self._response.release()

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events, one at a time, each with its trailing blank line."""
        content = self._response.content
        while True:
            try:
                event = await content.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)
            except TimeoutError as exc:
                raise UpstreamTimeout("the upstream sent nothing within the read timeout") from exc
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise BadGateway(f"the upstream broke off the stream: {exc}") from _untraced(exc)
            except ValueError as exc:  # LineTooLong
                raise BadGateway("the upstream sent an oversized event") from exc
            if not event:
                return
            yield event

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
        self._whole = aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=None)
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

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, stream: bool
    ) -> UpstreamResponse:
        """Send a request and wait for the status line and headers.

        A non-streaming answer may take the whole generation to start, so only streams get
        the read-gap timeout; the caller's deadline bounds the rest.
        """
        timeout = (
            None
            if stream
            else aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect, sock_read=None)
        )
        try:
            response = await self._session.post(
                url, data=body, headers=headers, timeout=timeout or aiohttp.helpers.sentinel
            )
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
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {_origin(url)} did not answer in time") from exc
        return UpstreamResponse(response)

    async def post_json(
        self, url: str, payload: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """A small JSON call (tokenize, detokenize). Any failure is UpstreamUnavailable."""
        try:
            async with asyncio.timeout(timeout_s):
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

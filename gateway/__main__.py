"""``python -m gateway``: run the gateway with uvicorn (one process, one event loop).

SIGTERM or Ctrl-C stops it gracefully (see :mod:`gateway.shutdown`) and the exit status is
0; a second Ctrl-C stops it at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import logging.handlers
import math
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from queue import SimpleQueue

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import create_app
from gateway.auth import load_keyring
from gateway.config import ConfigError
from gateway.settings import Settings, parse_settings
from gateway.shutdown import Drain

#: uvicorn's own deadline for open connections, this long after the drain's: by then the
#: drain has answered every request, so it only ends writes to clients that stopped reading.
BACKSTOP_S = 2


class _HandOff(logging.handlers.QueueHandler):
    """Puts records on the queue as they are: no formatting on the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


@contextlib.contextmanager
def configure_logging(level: str) -> Iterator[None]:
    """Logging for the process; access lines are written by a thread of their own."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Access lines are JSON objects, one per line, on stdout: easy to ship and to grep. They
    # are written off the event loop (a write to a slow pipe or terminal would stall every
    # request): the loop only enqueues the record, a listener thread formats and writes it.
    access = logging.getLogger("gateway.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    queue: SimpleQueue[logging.LogRecord] = SimpleQueue()
    listener = logging.handlers.QueueListener(queue, handler)
    hand_off = _HandOff(queue)
    access.addHandler(hand_off)
    listener.start()
    try:
        yield
    finally:
        listener.stop()  # writes what is still queued
        access.removeHandler(hand_off)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen_host(host: str, *, keys_enabled: bool) -> str:
    """Without API keys the gateway serves loopback only, whatever --host says, and says so."""
    log = logging.getLogger("gateway")
    if keys_enabled:
        return host
    if host not in LOOPBACK:
        log.warning(
            "no API keys configured: listening on 127.0.0.1 only, not %s "
            "(configure keys with --keys or GATEWAY_API_KEYS to serve other hosts)",
            host,
        )
        return "127.0.0.1"
    log.info("no API keys configured: serving local clients on %s only", host)
    return host


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, letting go of a connection as soon as it is lost.

    uvicorn cancels a connection's keep-alive timer only when the connection closes cleanly.
    When a client resets it instead (one that gave up, or abandoned a stream), the timer keeps
    the protocol, its transport and its last request's scope alive for the keep-alive
    timeout (30 s): under a steady rate of such clients, that many seconds of them (issue 16).
    """

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._unset_keepalive_if_required()


class GatewayServer(uvicorn.Server):
    """uvicorn's server, draining the gateway when it stops listening.

    uvicorn alone would wait for open requests without a limit (or cancel them with a bare
    500 and cut streams) and, after a signal, re-raise it so the process dies by it.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists now (the imported libraries, the runtime the lifespan built) lives as
        # long as the process. Frozen, it is no longer re-walked by every full collection:
        # measured at 3,500 req/s, those came every ~950 requests and stalled every open
        # request for 26-32 ms (the p99); frozen, 3.5 ms. Requests make no cyclic garbage.
        gc.collect()
        gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log = logging.getLogger("gateway")
        log.info("shutting down: draining, grace period %.1f s", self.drain.grace_s)
        self.drain.begin()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # A stop that was asked for and done in order is a clean exit: unlike uvicorn, do not
        # re-raise the signal once the server has stopped.
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    with configure_logging(settings.log_level):
        return _serve(settings)


def _serve(settings: Settings) -> int:
    log = logging.getLogger("gateway")
    drain = Drain(settings.shutdown_grace_s)
    try:
        app = create_app(settings, drain=drain)
        keys = load_keyring(settings.keys_path, settings.env_keys)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    host = listen_host(settings.host, keys_enabled=keys.enabled)
    server = build_server(app, settings, host, drain)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's "startup failed"


def build_server(app: ASGIApp, settings: Settings, host: str, drain: Drain) -> GatewayServer:
    """uvicorn as the gateway runs: uvloop, httptools, no uvicorn access log. ``app`` may wrap
    the gateway's (``loadtest/memprobe.py`` wraps it in a memory probe)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=settings.port,
        loop="uvloop",
        http=HttpProtocol,
        access_log=False,  # the gateway writes its own, richer access log
        log_level=settings.log_level,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + BACKSTOP_S,
    )
    return GatewayServer(config, drain)


if __name__ == "__main__":
    sys.exit(main())

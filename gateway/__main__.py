"""``python -m gateway``: run the gateway with uvicorn (one process, one event loop)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from gateway.app import create_app
from gateway.auth import load_keyring
from gateway.config import ConfigError
from gateway.settings import parse_settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Access lines are JSON objects, one per line, on stdout: easy to ship and to grep.
    access = logging.getLogger("gateway.access")
    access.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    log = logging.getLogger("gateway")
    try:
        app = create_app(settings)
        keys = load_keyring(settings.keys_path, settings.env_keys)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    host = listen_host(settings.host, keys_enabled=keys.enabled)
    uvicorn.run(
        app,
        host=host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # the gateway writes its own, richer access log
        log_level=settings.log_level,
        timeout_keep_alive=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m gateway``: run the gateway with uvicorn (one process, one event loop)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from gateway.app import create_app
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


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        logging.getLogger("gateway").error("invalid task table: %s", exc)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
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

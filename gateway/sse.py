"""Server-sent events as vLLM writes them: ``data: <json>\\n\\n`` and ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import GatewayError

DONE = b"data: [DONE]\n\n"
_PREFIX = b"data: "


def encode(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_event(error: GatewayError) -> bytes:
    """The in-band form of an error, for streams whose status line has already gone out."""
    return encode(error.envelope())


def payload(event: bytes) -> bytes:
    """The data of a single-line event, without the ``data: `` prefix and trailing newlines."""
    return event[len(_PREFIX) :].rstrip(b"\n") if event.startswith(_PREFIX) else b""


def is_data(event: bytes) -> bool:
    """A complete data event (what vLLM sends); anything else in a stream is garbage."""
    return event.startswith(_PREFIX) and event.endswith(b"\n\n")


def is_done(event: bytes) -> bool:
    return event.startswith(b"data: [DONE]")


def is_usage_only(event: bytes) -> bool:
    """The final usage chunk vLLM sends when ``include_usage`` is on: no choices, just usage.

    Checked on bytes first so the common content chunk costs no JSON parse.
    """
    return b'"choices":[]' in event and b'"usage":{' in event


def parse(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a data event, or None for anything else."""
    data = payload(event)
    if not data.startswith(b"{"):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None

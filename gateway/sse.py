"""Server-sent events as vLLM writes them: ``data: <json>\\n\\n`` and ``data: [DONE]\\n\\n``.

The relay moves *batches*: all the complete events that had arrived when it looked, as one
bytes object (see :meth:`gateway.outbound.UpstreamResponse.events`). A batch is forwarded
whole; only the rare batch that needs a change (the usage chunk a client did not ask for,
the first chunk of a two-step task) is split into its events.

JSON is orjson's: measured here, 1.4 us to parse a chunk against 9.0 us for the stdlib, and
0.9 us against 23.6 us to encode a request body (x86_64, 2 cores, Python 3.11).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from gateway.errors import GatewayError

DONE = b"data: [DONE]\n\n"
_PREFIX = b"data: "
_END = b"\n\n"


def encode(obj: Any) -> bytes:
    return _PREFIX + orjson.dumps(obj) + _END


def error_event(error: GatewayError) -> bytes:
    """The in-band form of an error, for streams whose status line has already gone out."""
    return encode(error.envelope())


def events(batch: bytes) -> Iterator[bytes]:
    """The events of a batch, each with its trailing blank line."""
    start = 0
    while (end := batch.find(_END, start)) >= 0:
        yield batch[start : end + 2]
        start = end + 2


def first_and_rest(batch: bytes) -> tuple[bytes, bytes]:
    """A batch's first event, and the rest of the batch."""
    end = batch.find(_END) + 2
    return batch[:end], batch[end:]


def payload(event: bytes) -> bytes:
    """The data of a single-line event, without the ``data: `` prefix and trailing newlines."""
    return event[len(_PREFIX) :].rstrip(b"\n") if event.startswith(_PREFIX) else b""


def is_done(batch: bytes) -> bool:
    """The event, or the batch, ends the stream."""
    return batch.endswith(DONE)


def has_usage_only(batch: bytes) -> bool:
    """The batch (or event) may hold the final usage chunk vLLM sends when ``include_usage``
    is on: no choices, just usage. Checked on bytes so a content batch costs no parse."""
    return b'"choices":[]' in batch and b'"usage":{' in batch


def parse_batch(batch: bytes) -> list[Any] | None:
    """Every data event of a batch (``[DONE]`` left out), decoded in one go: the events'
    payloads joined into one JSON array, so a burst of 50 chunks is one orjson call. None if
    the batch is anything but plain ``data: {...}`` events (then parse them one by one)."""
    if batch.endswith(DONE):
        batch = batch[: -len(DONE)]
    if not batch:
        return []
    if not batch.startswith(b"data: {") or not batch.endswith(b"}\n\n"):
        return None
    try:
        items = orjson.loads(b"[" + batch[6:-2].replace(b"\n\ndata: ", b",") + b"]")
    except orjson.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None


def parse(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a data event, or None for anything else."""
    data = payload(event)
    if not data.startswith(b"{"):
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None

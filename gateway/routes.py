"""The completion endpoints' HTTP glue: one ASGI callable that owns a request from its first
byte to its last.

    read body ─▶ key, task, class ─▶ serving (or a pipeline) ─▶ JSON answer ─┐
                                                             └▶ SSE events ──┴▶ record

The whole request, the stream's body included, runs inside one ``async with Lifecycle``
(:mod:`gateway.lifecycle`), so whatever ends it (an answer, an error, a bug, the client
leaving, a shutdown) releases its resources and records it exactly once; there is no gap
between "the handler returned a response" and "the body started" for a disconnect to fall
into. One watcher turns a client's disconnect, at any point after the body was read, into
:class:`~gateway.lifecycle.ClientGone`, which cancels the queue wait or closes the upstream
call. Shutdown: the part before the upstream runs under :meth:`Drain.watch` (a 503 if cut),
the stream under :meth:`Drain.stream` (an in-band error if cut).

``/v1/responses`` takes the same path as a chat request: its body is translated before the
chat request is parsed, and the chat answer or events (in-band errors included) after
(:mod:`gateway.responses`, :mod:`gateway.response_stream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
from starlette.types import Receive, Scope, Send

from gateway import sse
from gateway.auth import Tenant
from gateway.classes import ClassPolicy, ClassTable
from gateway.config import Config, Task
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
)
from gateway.exchange import Exchange
from gateway.lifecycle import ClientGone, Lifecycle
from gateway.metrics import Metrics
from gateway.pipeline import assist
from gateway.protocol import Endpoint, check_for_task, parse_json, parse_request
from gateway.response_stream import StreamTranslator, translate
from gateway.responses import ResponseShape
from gateway.runtime import Tables
from gateway.scheduler import Ticket
from gateway.serving import Serving
from gateway.shared_limits import SharedLimits
from gateway.shutdown import Drain
from gateway.steps import Answer, Budget, Step, Stream

log = logging.getLogger("gateway")

#: The client-facing API a request came in by: chat or completions, or the Responses API,
#: which runs as a chat request (see gateway.responses).
Surface = Endpoint | Literal["responses"]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-style proxies in front not to buffer
]


class Completions:
    """Serves ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/responses``. Built
    in the lifespan."""

    def __init__(
        self,
        tables: Tables,
        serving: Serving,
        drain: Drain,
        metrics: Metrics,
        limits: SharedLimits,
        *,
        clock: Callable[[], float],
        release: Callable[[Ticket], None],
        record: Callable[[Exchange], None],
        max_body_bytes: int,
    ) -> None:
        self._tables = tables
        self._serving = serving
        self._drain = drain
        self._metrics = metrics
        self._limits = limits
        self._clock = clock
        self._release = release
        self._record = record
        self._max_body_bytes = max_body_bytes

    async def handle(self, endpoint: Surface, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        ex = Exchange(request_id, self._clock())
        out = _Responder(send, ex, self._clock)
        life = Lifecycle(ex, self._clock, release=self._release, record=self._record)
        async with life:
            try:
                headers = _headers(scope)
                raw = await _read_body(receive, headers, self._max_body_bytes)
                async with _cancel_on_disconnect(receive):
                    # Until it reaches an upstream a request is answered at once on SIGTERM;
                    # after, it may run on for the grace period.
                    with self._drain.watch(started=lambda: ex.dispatched_at is not None):
                        result, shape = await self._serve(life, endpoint, headers, raw)
                    if isinstance(result, Answer):
                        body = result.body if shape is None else shape.response(result.body)
                        await out.json(200, _encode(body), result.headers)
                    else:
                        events = self._drain.stream(result.events, life.failed)
                        if shape is not None:
                            # Outside the drain, so its cut's in-band error is retold too.
                            translator = StreamTranslator(shape)
                            out.in_band = translator.failed
                            events = translate(events, translator)
                        await out.stream(events, result.headers)
            except GatewayError as exc:
                life.failed(exc)
                await out.error(exc)
            except ClientGone as exc:
                life.failed(exc)  # nobody is listening for an answer
            except Exception as exc:
                log.exception("request %s failed", request_id, exc_info=exc)
                life.failed(exc)
                await out.error(
                    GatewayError(
                        "internal gateway error; see the gateway log", code="internal_error"
                    )
                )

    async def _serve(
        self, life: Lifecycle, endpoint: Surface, headers: Mapping[str, str], raw: bytes
    ) -> tuple[Answer | Stream, ResponseShape | None]:
        tables = self._tables  # one task table for the whole request, even if a reload lands
        config, tenant = tables.config, tables.keys.identify(headers.get("authorization"))
        body = parse_json(raw)
        task = _resolve_task(config, body.get("model"), headers.get("x-task"))
        ex = life.exchange
        ex.task = task.name
        tenant.check_task(task.name)
        wanted = _wanted_class(config.classes, headers.get("x-priority"), tenant)
        policy = _policy(config.classes, task, wanted, tenant)
        ex.priority_class = policy.name
        shape = None
        if endpoint == "responses":
            shape = ResponseShape.parse(body)
            shape.model = task.name
            request = parse_request("chat", shape.chat_body)
        else:
            request = parse_request(endpoint, body)
        check_for_task(task, request, config.tasks)
        ex.stream = request.stream
        try:
            life.hold(await self._limits.admit(tenant))
        except RateLimited as exc:
            self._metrics.rejections.labels(policy.name, exc.code or "rate_limited").inc()
            raise
        step = Step(
            task,
            policy,
            request,
            Budget.for_task(task, headers.get("x-request-deadline-ms")),
            tenant=tenant.name,
        )
        if task.pipeline is None:
            result = await self._serving.run(life, step)
        else:
            label_task = config.tasks[task.pipeline.label_task]
            label_policy = _policy(config.classes, label_task, wanted, tenant)
            result = await assist(self._serving, life, config, step, label_policy)
        result.headers["X-Task"] = task.name
        result.headers["X-Priority-Class"] = policy.name
        return result, shape


def _wanted_class(classes: ClassTable, wanted: str | None, tenant: Tenant) -> str | None:
    """The class asked for with ``X-Priority``, checked against the table and the key."""
    if wanted is None:
        return None
    if wanted not in classes:
        raise BadRequest(
            f"X-Priority must be one of {', '.join(classes.names())}",
            param="X-Priority",
            code="invalid_value",
        )
    ceiling = classes[tenant.ceiling()]
    if classes[wanted].rank < ceiling.rank:
        raise Forbidden(
            f"this API key may not use the {wanted} class (its ceiling is {ceiling.name})",
            param="X-Priority",
            code="class_not_allowed",
        )
    return wanted


def _policy(classes: ClassTable, task: Task, wanted: str | None, tenant: Tenant) -> ClassPolicy:
    """The task's class, lowered by ``X-Priority`` and capped by the key's ceiling."""
    return classes.lowered(classes.lowered(classes[task.priority_class], wanted), tenant.ceiling())


def _resolve_task(config: Config, model: Any, header: str | None) -> Task:
    """``X-Task`` wins (for clients that cannot change ``model``), else ``model`` names the task."""
    name = header if header is not None else model
    task = config.tasks.get(name) if isinstance(name, str) else None
    if task is None:
        where = "X-Task header" if header is not None else "model"
        raise TaskNotFound(
            f"unknown task {name!r} in {where}; valid tasks: {', '.join(config.task_names())}",
            param="model" if header is None else "X-Task",
            code="model_not_found",
        )
    return task


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers this glue reads, by lower-case name (Latin-1, as HTTP has it)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


async def _read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes", code="body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@asynccontextmanager
async def _cancel_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the enclosed work if the client disconnects, and raise ClientGone instead.

    Starts after the body is read: from then on this watcher is the only reader of
    ``receive``, for the answer's whole life, stream included.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


class _Responder:
    """Writes the answer with ASGI messages, and remembers whether its status line went out
    (after that, errors can only go in band)."""

    def __init__(self, send: Send, ex: Exchange, clock: Callable[[], float]) -> None:
        self._send = send
        self._ex = ex
        self._clock = clock
        self.started = False
        #: How an error is told once the answer has started (a Responses stream's own way).
        self.in_band: Callable[[GatewayError], bytes] = _chat_in_band

    async def _start(
        self, status: int, base: list[tuple[bytes, bytes]], extra: Mapping[str, str]
    ) -> None:
        headers = base + [(k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()]
        headers.append((b"server-timing", self._ex.server_timing(self._clock()).encode()))
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def json(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        await self._start(status, [_JSON, (b"content-length", str(len(body)).encode())], headers)
        await self._send({"type": "http.response.body", "body": body})

    async def stream(self, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        await self._start(200, list(_SSE_HEADERS), headers)
        send = self._send
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def error(self, exc: GatewayError) -> None:
        """The error as a status and envelope, or in band if the answer has started."""
        if self.started:
            await self._send({"type": "http.response.body", "body": self.in_band(exc)})
            return
        await self.json(exc.status, exc.body(), exc.headers)


def _chat_in_band(exc: GatewayError) -> bytes:
    return sse.error_event(exc) + sse.DONE


def _encode(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)

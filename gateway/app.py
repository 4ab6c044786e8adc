"""The Starlette application: routes, lifespan, and the request path's outer shell.

Everything long-lived is built in the lifespan and reaches handlers as lifespan state
(``request.state.runtime``); there are no globals. The outer shell of a request is the same
for every endpoint: read and parse the body, resolve the task, then run the rest under a
watch that cancels it if the client disconnects (so a request nobody waits for leaves the
queue, or has its upstream request aborted), and under the shutdown's watch (so a SIGTERM
answers it, or lets it finish within the grace period; see :mod:`gateway.shutdown`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from gateway.auth import Tenant, load_keyring
from gateway.config import Config, Task, load_config
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    PayloadTooLarge,
    RateLimited,
    TaskNotFound,
)
from gateway.exchange import Exchange, outcome_for_status, record
from gateway.middleware import RequestIdMiddleware
from gateway.pipeline import assist
from gateway.protocol import Endpoint, parse_json, parse_request
from gateway.proxy import Budget, Step, serve
from gateway.runtime import Runtime, build_runtime, close_runtime, start_background
from gateway.settings import Settings
from gateway.shutdown import Drain
from gateway.status import snapshot

log = logging.getLogger("gateway")


class ClientGone(Exception):
    """The client disconnected before its answer started."""


def create_app(
    settings: Settings, config: Config | None = None, *, drain: Drain | None = None
) -> Starlette:
    """The gateway as an ASGI app. Raises ConfigError at once if the task table or the keys
    are invalid.

    ``drain`` is the server's handle on graceful shutdown: whoever runs the app calls
    ``drain.begin()`` when it stops accepting connections (``python -m gateway`` does).
    """
    config = config or load_config(settings.tasks_path)
    keys = load_keyring(settings.keys_path, settings.env_keys)
    drain = drain or Drain(settings.shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        runtime = build_runtime(settings, config, CollectorRegistry(auto_describe=True), keys)
        background = start_background(runtime)
        hup = _on_sighup(lambda: runtime.reload(settings.tasks_path))
        try:
            yield {"runtime": runtime, "drain": drain}
        finally:
            hup()
            drain.close()
            await close_runtime(runtime, background)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/status", partial(status_page, _static("status.html")), methods=["GET"]),
        Route("/status.json", status_json, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


async def chat_completions(request: Request) -> Response:
    return await _handle(request, "chat")


async def completions(request: Request) -> Response:
    return await _handle(request, "completions")


async def _handle(request: Request, endpoint: Endpoint) -> Response:
    rt: Runtime = request.state.runtime
    drain: Drain = request.state.drain
    request_id: str = request.state.request_id
    ex = Exchange(request_id, rt.dispatcher.now())
    headers = {"X-Request-Id": request_id}
    try:
        # Until it reaches an upstream a request is answered at once on SIGTERM; after, it
        # may run on for the grace period.
        with drain.watch(started=lambda: ex.dispatched_at is not None):
            tenant = rt.keys.identify(request.headers.get("authorization"))
            raw = await _read_body(request, rt.settings.max_body_bytes)
            async with _cancel_on_disconnect(request.receive):
                response = await _route(rt, ex, request, endpoint, raw, headers, tenant)
        if isinstance(response, StreamingResponse):
            response.body_iterator = drain.stream(response.body_iterator)
    except GatewayError as exc:
        ex.fail(exc.status, outcome_for_status(exc.status, exc.code), exc.code)
        response = Response(
            exc.body(),
            status_code=exc.status,
            media_type="application/json",
            headers={
                **headers,
                **exc.headers,
                "Server-Timing": ex.server_timing(rt.dispatcher.now()),
            },
        )
    except (ClientGone, ClientDisconnect):
        ex.fail(499, "cancelled", "client_closed")
        response = Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    if not isinstance(response, StreamingResponse):  # a stream records itself when it ends
        record(ex, rt.metrics, rt.dispatcher.now(), log=rt.settings.access_log)
    return response


async def _route(
    rt: Runtime,
    ex: Exchange,
    request: Request,
    endpoint: Endpoint,
    raw: bytes,
    headers: dict[str, str],
    tenant: Tenant,
) -> Response:
    body = parse_json(raw)
    config = rt.config  # one table for the whole request, even if a reload lands meanwhile
    task = _resolve_task(config, body.get("model"), request.headers.get("x-task"))
    ex.task = task.name
    tenant.check_task(task.name)
    base = config.classes[task.priority_class]
    wanted = request.headers.get("x-priority")
    if wanted is not None and wanted not in config.classes:
        raise BadRequest(
            f"X-Priority must be one of {', '.join(config.classes.names())}",
            param="X-Priority",
            code="invalid_value",
        )
    ceiling = config.classes[tenant.ceiling()]
    if wanted is not None and config.classes[wanted].rank < ceiling.rank:
        raise Forbidden(
            f"this API key may not use the {wanted} class (its ceiling is {ceiling.name})",
            param="X-Priority",
            code="class_not_allowed",
        )
    # The key's ceiling caps every request: a task above it runs at the ceiling.
    policy = config.classes.lowered(config.classes.lowered(base, wanted), ceiling.name)
    ex.priority_class = policy.name
    client_request = parse_request(endpoint, body)
    try:
        tenant.admit(rt.dispatcher.now())
    except RateLimited as exc:
        rt.metrics.rejections.labels(policy.name, exc.code or "rate_limited").inc()
        raise
    ex.on_done = lambda done: tenant.done(
        rt.dispatcher.now(), (done.prompt_tokens or 0) + (done.completion_tokens or 0)
    )
    ex.stream = client_request.stream
    step = Step(
        task,
        policy,
        client_request,
        Budget.for_task(task, request.headers.get("x-request-deadline-ms")),
        tenant=tenant.name,
    )
    headers["X-Task"] = task.name
    headers["X-Priority-Class"] = policy.name
    if task.pipeline is not None:
        return await assist(rt, ex, config, step, headers)
    return await serve(rt, ex, step, headers)


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


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@asynccontextmanager
async def _cancel_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Cancel the enclosed work if the client disconnects; raise ClientGone instead.

    Starts after the body is read (the watcher consumes ``receive``) and ends before a
    streaming response takes over, which watches for disconnects itself.
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


async def models(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    config = rt.config
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": task.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "qwen-gateway",
                    "description": task.description,
                    "priority_class": task.priority_class,
                    "labels": list(task.labels) if task.labels else None,
                }
                for task in config.tasks.values()
            ],
            "upstream_models": rt.upstreams.models(),
        }
    )


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    upstreams = {
        u.name: {"up": u.up, "model": u.model, "error": u.last_error}
        for u in rt.upstreams.by_name.values()
    }
    ok = rt.upstreams.any_up()
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "upstreams": upstreams},
        status_code=200 if ok else 503,
    )


async def metrics(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def status_page(page: bytes, request: Request) -> Response:
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


async def status_json(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    return JSONResponse(snapshot(rt), headers={"Cache-Control": "no-store"})


def _static(name: str) -> bytes:
    """A file shipped in ``gateway/static`` (package data), read once when the app is built."""
    return resources.files("gateway").joinpath("static", name).read_bytes()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = GatewayError(
        exc.detail or "error", code="not_found" if exc.status_code == 404 else None
    )
    error.status = exc.status_code
    error.type = "invalid_request_error"
    return Response(error.body(), status_code=exc.status_code, media_type="application/json")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    error = GatewayError("internal gateway error; see the gateway log", code="internal_error")
    # This handler runs outside RequestIdMiddleware, so the id is added here.
    request_id = getattr(request.state, "request_id", None)
    headers = {"X-Request-Id": request_id} if request_id else None
    return Response(error.body(), status_code=500, media_type="application/json", headers=headers)


def _on_sighup(reload: Any) -> Any:
    """Install a SIGHUP handler (main thread only); return a function that removes it."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (RuntimeError, ValueError):  # not the main thread (tests run servers in threads)
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)

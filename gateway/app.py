"""The Starlette application: routes and lifespan, composing the rest.

Everything long-lived is built in the lifespan and reaches handlers as lifespan state; there
are no globals. The completion endpoints are raw ASGI callables served by
:class:`gateway.routes.Completions`, which owns each request from its first byte to its last;
the small endpoints (models, health, readiness, metrics, status, the playground) are plain
handlers here.
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
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.auth import load_keyring
from gateway.config import Config, Task, load_config
from gateway.errors import GatewayError, TaskNotFound
from gateway.exchange import Exchange, record
from gateway.history import History, Sampler
from gateway.middleware import RequestIdMiddleware
from gateway.routes import Completions, Surface
from gateway.runtime import Runtime, build_runtime, close_runtime, start_background
from gateway.settings import Settings
from gateway.shutdown import Drain
from gateway.upstreams_file import load_upstreams_file

log = logging.getLogger("gateway")


def create_app(
    settings: Settings,
    config: Config | None = None,
    *,
    drain: Drain | None = None,
    history: History | None = None,
) -> Starlette:
    """The gateway as an ASGI app. Raises ConfigError at once if the task table or the keys
    are invalid.

    ``drain`` is the server's handle on graceful shutdown: whoever runs the app calls
    ``drain.begin()`` when it stops accepting connections (``python -m gateway`` does).
    ``history`` is where the status page's time series is kept (default: a point every 2 s
    for 10 minutes); tests pass a faster one.
    """
    config = config or load_config(settings.tasks_path)
    keys = load_keyring(settings.keys_path, settings.env_keys)
    path = settings.upstreams_file
    entries = None if path is None else load_upstreams_file(path)
    drain = drain or Drain(settings.shutdown_grace_s)
    history = History() if history is None else history  # an empty one is falsy

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        registry = CollectorRegistry(auto_describe=True)
        runtime = build_runtime(settings, config, registry, keys, entries)
        sampler = Sampler(runtime.status, runtime.metrics, history, runtime.dispatcher.now)
        background = [
            *start_background(runtime),
            asyncio.create_task(sampler.run(), name="status-history"),
        ]
        hup = _on_sighup(partial(_reload, runtime, settings))
        completions = Completions(
            runtime.tables,
            runtime.serving,
            drain,
            runtime.metrics,
            runtime.limits,
            clock=runtime.dispatcher.now,
            release=runtime.dispatcher.release,
            record=partial(_record, runtime),
            max_body_bytes=settings.max_body_bytes,
        )
        try:
            yield {"runtime": runtime, "completions": completions, "history": history}
        finally:
            hup()
            drain.close()
            await close_runtime(runtime, background)

    routes = [
        Route("/v1/chat/completions", _CompletionEndpoint("chat"), methods=["POST"]),
        Route("/v1/completions", _CompletionEndpoint("completions"), methods=["POST"]),
        Route("/v1/responses", _CompletionEndpoint("responses"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/status", partial(static_page, _static("status.html")), methods=["GET"]),
        Route("/status.json", status_json, methods=["GET"]),
        Route("/playground", partial(static_page, _static("playground.html")), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


class _CompletionEndpoint:
    """The ASGI app of one completion route: the lifespan's :class:`Completions` serves it."""

    def __init__(self, endpoint: Surface) -> None:
        self.endpoint: Surface = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completions: Completions = scope["state"]["completions"]
        await completions.handle(self.endpoint, scope, receive, send)


def _model_entry(task: Task) -> dict[str, Any]:
    return {
        "id": task.name,
        "object": "model",
        "created": 0,
        "owned_by": "qwen-gateway",
        "description": task.description,
        "priority_class": task.priority_class,
        "labels": list(task.labels) if task.labels else None,
        "tools": task.tools,
        "sla_latency_s": task.sla_latency_s,
        "sla_ttft_s": task.sla_ttft_s,
    }


async def models(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    return JSONResponse(
        {
            "object": "list",
            "data": [_model_entry(task) for task in rt.config.tasks.values()],
            "upstream_models": rt.upstreams.models(),
            # For the playground: whether to ask for a key (the completion routes need one).
            "auth_required": rt.tables.keys.enabled,
        }
    )


async def model(request: Request) -> Response:
    """One task, as OpenAI's ``GET /v1/models/{model}`` answers for one model."""
    rt: Runtime = request.state.runtime
    name = request.path_params["model"]
    task = rt.config.tasks.get(name)
    if task is None:
        error = TaskNotFound(
            f"unknown task {name!r}; valid tasks: {', '.join(rt.config.task_names())}",
            param="model",
            code="model_not_found",
        )
        return Response(error.body(), status_code=error.status, media_type="application/json")
    return JSONResponse(_model_entry(task))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    rt: Runtime = request.state.runtime
    upstreams = {
        u.name: {
            "up": u.usable,
            "state": u.state,
            "overflow": u.overflow,
            "model": u.model,
            "error": u.last_error,
        }
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


async def static_page(page: bytes, request: Request) -> Response:
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


async def status_json(request: Request) -> Response:
    """The status snapshot with its history: all of it, or the points after ``?since=T``."""
    rt: Runtime = request.state.runtime
    history: History = request.state.history
    raw = request.query_params.get("since")
    try:
        since = None if raw is None else float(raw)
    except ValueError:
        raise HTTPException(400, "since must be a number (a point's t)") from None
    body = rt.status.snapshot()
    body["history"] = history.report(rt.dispatcher.now(), since)
    body["bounds"]["history"] = {"max_points": history.max_points, "kept": len(history)}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _reload(rt: Runtime, settings: Settings) -> None:
    """SIGHUP: the task table and keys now, the upstreams file on the roster's next pass."""
    rt.reload(settings.tasks_path)
    if rt.roster is not None:
        rt.roster.wake()


def _record(rt: Runtime, exchange: Exchange) -> None:
    record(exchange, rt.metrics, rt.dispatcher.now(), log=rt.settings.access_log)


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

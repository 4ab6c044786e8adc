"""The long-lived parts of one gateway, built in the app's lifespan.

The runtime is the composition root, not a service locator: the app hands each part only
the other parts it uses. Nothing here is global: tests build as many runtimes as they need.
The task table and the keys are the parts that change while running (SIGHUP); they live in
:class:`Tables`, which handlers read once per request, so a request keeps the table it
started with while new ones see the new table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.auth import KeyRing, load_keyring
from gateway.config import Config, ConfigError, load_config
from gateway.dispatch import Dispatcher
from gateway.metrics import Metrics
from gateway.outbound import Limits, Timeouts, UpstreamClient
from gateway.recent import Recent
from gateway.routing import Router
from gateway.scheduler import Scheduler, Window
from gateway.scrape import Scraper, VllmLoad
from gateway.serving import Serving
from gateway.settings import Settings
from gateway.sizing import Sizing
from gateway.status import Status
from gateway.upstreams import Upstream, Upstreams, upstream_name

log = logging.getLogger("gateway")


@dataclass
class Tables:
    """The task table and the API keys: swapped whole by a reload."""

    config: Config
    keys: KeyRing


@dataclass
class Runtime:
    settings: Settings
    tables: Tables
    metrics: Metrics
    scheduler: Scheduler
    dispatcher: Dispatcher
    client: UpstreamClient
    upstreams: Upstreams
    scraper: Scraper
    sizing: Sizing
    serving: Serving
    status: Status

    @property
    def config(self) -> Config:
        return self.tables.config

    def reload(self, path: Path | None) -> bool:
        """Swap in a new task table and keys; keep the old ones (and say why) if one is invalid.

        Reloaded keys start with fresh rate buckets and concurrency counts.
        """
        try:
            config = load_config(path)
            keys = load_keyring(self.settings.keys_path, self.settings.env_keys)
        except ConfigError as exc:
            log.error("task table reload refused, keeping the old one: %s", exc)
            self.metrics.reloads.labels("refused").inc()
            return False
        self.tables.config, self.tables.keys = config, keys
        self.scheduler.reconfigure(
            config.classes, config.max_queued, config.fairness, keys.weights()
        )
        self.sizing.reconfigure(config)
        self.metrics.preinitialise(
            ((t.name, t.priority_class) for t in config.tasks.values()),
            config.classes.names(),
            self.upstreams.by_name,
        )
        self.metrics.reloads.labels("ok").inc()
        self.dispatcher.kick()
        log.info("task table reloaded: %s", ", ".join(config.task_names()))
        return True


def build_runtime(
    settings: Settings, config: Config, registry: CollectorRegistry, keys: KeyRing
) -> Runtime:
    """Assemble a runtime. Call inside the running event loop (the client and timers need it)."""
    client = UpstreamClient(
        Timeouts(connect=settings.connect_timeout_s, read_gap=settings.read_timeout_s), Limits()
    )
    names = [upstream_name(url) for url in settings.upstreams]
    metrics = Metrics(
        registry,
        ((t.name, t.priority_class) for t in config.tasks.values()),
        config.classes.names(),
        names,
    )
    windows = [Window(name, settings.window, usable=False) for name in names]
    scheduler = Scheduler(
        config.classes,
        config.max_queued,
        windows,
        config.fairness,
        keys.weights(),
        Router(settings.routing),
    )
    dispatcher = Dispatcher(scheduler, metrics)
    sizing = Sizing(
        windows,
        config,
        max_size=settings.window,
        mode=settings.window_mode,
        running=scheduler.running,
        clock=dispatcher.now,
        on_grow=dispatcher.kick,
        scrape_interval_s=settings.health_interval_s,
    )

    def on_change(upstream: Upstream) -> None:
        scheduler.windows[upstream.name].usable = upstream.up
        metrics.upstream_up.labels(upstream.name).set(1 if upstream.up else 0)
        dispatcher.kick()

    upstreams = Upstreams(
        settings.upstreams, client, on_change, settings.health_interval_s, clock=dispatcher.now
    )

    def on_load(name: str, load: VllmLoad | None) -> None:
        # Other clients' requests at the upstream (e.g. other gateways'); a stale or missing
        # reading counts as none, so it can never hold the window shut.
        scheduler.windows[name].external = 0 if load is None else load.external
        if load is None:
            metrics.set_upstream_load(name, 0.0, 0.0, 0.0)
            sizing.decoded(name, dispatcher.now(), None, None)
        else:
            metrics.set_upstream_load(name, load.running, load.waiting, load.kv_cache_usage or 0.0)
            sizing.decoded(name, load.at, load.decode_s, load.decode_tokens)
        dispatcher.kick()

    scraper = Scraper(
        upstreams.by_name.values(),
        client,
        on_load,
        settings.health_interval_s,
        dispatcher.now,
        ours=lambda name: scheduler.windows[name].inflight,
    )
    recent = Recent()
    metrics.on_request = recent.add
    tables = Tables(config, keys)
    status = Status(
        lambda: tables.config,
        scheduler,
        upstreams,
        scraper,
        recent,
        metrics.rejections,
        dispatcher.now,
    )
    metrics.watch_service(partial(_service, scheduler))
    for pclass in config.classes.names():
        metrics.watch_fairness(pclass, partial(_fairness_index, scheduler, dispatcher.now, pclass))
        metrics.watch_queue(pclass, partial(scheduler.depth, pclass))
        metrics.watch_capacity(pclass, partial(_class_capacity, scheduler, pclass))
    for window in windows:
        metrics.watch_inflight(window.name, partial(getattr, window, "inflight"))
        metrics.watch_window(window.name, partial(getattr, window, "size"))
        metrics.watch_breaker(window.name, partial(upstreams.breaker_state, window.name))
    serving = Serving(dispatcher, upstreams, client, metrics, sizing)
    return Runtime(
        settings,
        tables,
        metrics,
        scheduler,
        dispatcher,
        client,
        upstreams,
        scraper,
        sizing,
        serving,
        status,
    )


def _class_capacity(scheduler: Scheduler, pclass: str) -> int:
    return scheduler.classes[pclass].max_queued  # read live: a reload may change it


def _fairness_index(scheduler: Scheduler, clock: Callable[[], float], pclass: str) -> float:
    return scheduler.ledgers()[pclass].fairness_index(clock())


def _service(scheduler: Scheduler) -> Iterator[tuple[str, str, float]]:
    for pclass, ledger in scheduler.ledgers().items():
        for tenant, tokens in ledger.served.items():
            yield tenant, pclass, tokens


def start_background(runtime: Runtime) -> list[asyncio.Task[None]]:
    """Start the loops that watch the upstreams (health checks, metrics scraping) and size
    their windows."""
    return [
        asyncio.create_task(runtime.upstreams.run(), name="upstream-health"),
        asyncio.create_task(runtime.scraper.run(), name="upstream-metrics"),
        asyncio.create_task(runtime.sizing.run(), name="window-sizing"),
    ]


async def close_runtime(runtime: Runtime, background: Iterable[asyncio.Task[None]] = ()) -> None:
    tasks = list(background)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runtime.client.close()

"""The long-lived parts of one gateway, built in the app's lifespan.

The runtime is the composition root, not a service locator: the app hands each part only
the other parts it uses. Nothing here is global: tests build as many runtimes as they need.
The task table and the keys are the parts that change while running (SIGHUP); they live in
:class:`Tables`, which handlers read once per request, so a request keeps the table it
started with while new ones see the new table. With ``--upstreams-file`` the upstream set
changes too: the :class:`~gateway.roster.Roster` decides, and
:class:`~gateway.membership.Membership` changes every part that knows of an upstream.
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
from gateway.leases import Leases
from gateway.membership import Membership, lease_slots, watch_upstream
from gateway.metrics import Metrics
from gateway.outbound import Limits, Timeouts, UpstreamClient
from gateway.recent import Recent
from gateway.roster import Roster
from gateway.routing import Router
from gateway.scheduler import Scheduler, Window
from gateway.scrape import Scraper, VllmLoad
from gateway.serving import Serving
from gateway.settings import Settings
from gateway.shared import RedisLink
from gateway.shared_limits import SharedLimits
from gateway.sizing import Sizing
from gateway.status import Status
from gateway.upstreams import Upstream, Upstreams, upstream_name
from gateway.upstreams_file import Entry

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
    limits: SharedLimits
    link: RedisLink | None = None  # with --redis
    leases: Leases | None = None
    roster: Roster | None = None  # with --upstreams-file: keeps the set in step with it

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
    settings: Settings,
    config: Config,
    registry: CollectorRegistry,
    keys: KeyRing,
    upstream_entries: tuple[Entry, ...] | None = None,
) -> Runtime:
    """Assemble a runtime. Call inside the running event loop (the client and timers need it).

    ``upstream_entries``: the upstreams file as loaded at the start; the roster then adds them
    all (and later changes), and ``settings.upstreams`` is not used."""
    client = UpstreamClient(
        Timeouts(connect=settings.connect_timeout_s, read_gap=settings.read_timeout_s), Limits()
    )
    urls = () if upstream_entries is not None else settings.upstreams
    names = [upstream_name(url) for url in urls]
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
        scheduler.windows[upstream.name].usable = upstream.usable
        metrics.upstream_up.labels(upstream.name).set(1 if upstream.usable else 0)
        dispatcher.kick()

    upstreams = Upstreams(urls, client, on_change, settings.health_interval_s, clock=dispatcher.now)

    def on_load(name: str, load: VllmLoad | None) -> None:
        # Other clients' requests at the upstream (e.g. other gateways'); a stale or missing
        # reading counts as none, so it can never hold the window shut.
        if name not in scheduler.windows:
            return  # forgotten (drained) meanwhile
        window = scheduler.windows[name]
        if load is None:
            window.external = 0
            metrics.set_upstream_load(name, 0.0, 0.0, 0.0)
            sizing.decoded(name, dispatcher.now(), None, None)
        else:
            window.see_others(latest=load.others, peak=load.external)
            metrics.set_upstream_load(name, load.running, load.waiting, load.kv_cache_usage or 0.0)
            sizing.decoded(name, load.at, load.decode_s, load.decode_tokens)
        dispatcher.kick()

    link = leases = None
    if settings.redis_url:
        link, leases = _share(settings.redis_url, metrics, scheduler, dispatcher)
    scraper = Scraper(
        upstreams.by_name.values(),
        client,
        on_load,
        settings.health_interval_s,
        dispatcher.now,
        # Ours and, with Redis, the other gateways' leased slots: the scraped rest is load from
        # clients that are not gateways (the leases already count the gateways exactly).
        ours=lambda name: scheduler.windows[name].inflight + scheduler.windows[name].shared,
        settle=None if leases is None else leases.sync,
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
    # Autoscaling signals: read over the scheduler's live queues and windows at scrape time.
    metrics.watch_saturation(scheduler.saturation)
    for pclass in config.classes.names():
        metrics.watch_oldest_wait(pclass, partial(_oldest_wait, scheduler, dispatcher.now, pclass))
    for window in windows:
        watch_upstream(metrics, window, upstreams)
    serving = Serving(dispatcher, upstreams, client, metrics, sizing)
    limits = SharedLimits(dispatcher.now, link, lambda: tables.keys.tenants.values())
    roster = None
    if upstream_entries is not None:
        assert settings.upstreams_file is not None
        members = Membership(upstreams, scheduler, sizing, scraper, metrics, dispatcher.kick)
        roster = Roster(
            settings.upstreams_file,
            upstream_entries,
            members,
            settings.health_interval_s,
            on_reload=lambda ok: metrics.upstream_reloads.labels("ok" if ok else "refused").inc(),
        )
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
        limits,
        link,
        leases,
        roster,
    )


def _share(
    url: str, metrics: Metrics, scheduler: Scheduler, dispatcher: Dispatcher
) -> tuple[RedisLink, Leases]:
    """The Redis link and the window leases: state shared with the other gateways."""
    redis_up = metrics.watch_redis()
    link = RedisLink(url, on_change=lambda up: redis_up.set(1 if up else 0))
    leases = Leases(link, scheduler.windows, lambda: scheduler.queued, dispatcher.kick)
    dispatcher.after_pump = leases.wake
    for window in scheduler.windows.values():
        metrics.watch_lease(window.name, partial(lease_slots, window))
    return link, leases


def _class_capacity(scheduler: Scheduler, pclass: str) -> int:
    return scheduler.classes[pclass].max_queued  # read live: a reload may change it


def _fairness_index(scheduler: Scheduler, clock: Callable[[], float], pclass: str) -> float:
    return scheduler.ledgers()[pclass].fairness_index(clock())


def _oldest_wait(scheduler: Scheduler, clock: Callable[[], float], pclass: str) -> float:
    return scheduler.oldest_wait(pclass, clock())


def _service(scheduler: Scheduler) -> Iterator[tuple[str, str, float]]:
    for pclass, ledger in scheduler.ledgers().items():
        for tenant, tokens in ledger.served.items():
            yield tenant, pclass, tokens


def start_background(runtime: Runtime) -> list[asyncio.Task[None]]:
    """Start the loops that watch the upstreams (health checks, metrics scraping) and size
    their windows."""
    tasks = [
        asyncio.create_task(runtime.upstreams.run(), name="upstream-health"),
        asyncio.create_task(runtime.scraper.run(), name="upstream-metrics"),
        asyncio.create_task(runtime.sizing.run(), name="window-sizing"),
    ]
    if runtime.link is not None and runtime.leases is not None:
        tasks.append(asyncio.create_task(runtime.link.run(), name="redis-link"))
        tasks.append(asyncio.create_task(runtime.leases.run(), name="window-leases"))
    if runtime.roster is not None:
        tasks.append(asyncio.create_task(runtime.roster.run(), name="upstreams-file"))
    return tasks


async def close_runtime(runtime: Runtime, background: Iterable[asyncio.Task[None]] = ()) -> None:
    tasks = list(background)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runtime.limits.drain()
    if runtime.link is not None:
        await runtime.link.close()  # its shares go back now, not after the TTL
    await runtime.client.close()

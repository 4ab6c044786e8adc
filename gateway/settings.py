"""Process settings: fixed for the life of the process (the task table is the reloadable part).

Each setting has a command-line flag and an environment variable; the flag wins.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.routing import ROUTING_MODES, RoutingMode
from gateway.window_tuning import WindowMode


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway process needs besides the task table.

    ``window`` is the most requests that may be in flight at one vLLM: set it to that vLLM's
    ``--max-num-seqs`` so vLLM's own queue stays empty and the order is decided here, where
    aging, deadlines and preemption can still change it. With ``window_mode`` "adaptive" (the
    default) the window in use is sized below that from measured latency (see
    :mod:`gateway.sizing`); "fixed" keeps it at ``window``.

    ``shutdown_grace_s`` is how long requests already at an upstream may run on after SIGTERM
    (see :mod:`gateway.shutdown`).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    upstreams: tuple[str, ...] = ("http://127.0.0.1:8000",)
    window: int = 8
    window_mode: WindowMode = "adaptive"
    tasks_path: Path | None = None
    keys_path: Path | None = None
    env_keys: str | None = None  # GATEWAY_API_KEYS; never a flag, so keys stay out of `ps`
    max_body_bytes: int = 1_048_576
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    health_interval_s: float = 2.0
    shutdown_grace_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    redis_url: str | None = None  # shared state between gateways (gateway.shared)
    # Replaces ``upstreams`` when set: a set that may change while running (gateway.roster).
    upstreams_file: Path | None = None
    routing: RoutingMode = "affinity"  # which upstream with room a request takes (gateway.routing)


_ENV = {
    "host": "GATEWAY_HOST",
    "port": "GATEWAY_PORT",
    "upstreams": "UPSTREAMS",
    "window": "GATEWAY_WINDOW",
    "window_mode": "GATEWAY_WINDOW_MODE",
    "tasks": "GATEWAY_TASKS",
    "keys": "GATEWAY_KEYS",
    "max_body_bytes": "GATEWAY_MAX_BODY_BYTES",
    "connect_timeout": "GATEWAY_CONNECT_TIMEOUT",
    "read_timeout": "GATEWAY_READ_TIMEOUT",
    "health_interval": "GATEWAY_HEALTH_INTERVAL",
    "shutdown_grace": "GATEWAY_SHUTDOWN_GRACE",
    "access_log": "GATEWAY_ACCESS_LOG",
    "log_level": "GATEWAY_LOG_LEVEL",
    "redis": "GATEWAY_REDIS_URL",
    "upstreams_file": "GATEWAY_UPSTREAMS_FILE",
    "routing": "GATEWAY_ROUTING",
}


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if env is None else env
    d = Settings()
    p = argparse.ArgumentParser(
        prog="qwen-gateway",
        description="OpenAI-compatible gateway that keeps per-task SLAs in front of vLLM.",
    )

    def opt(name: str, default: object, help: str, kind: type = str) -> None:
        var = _ENV[name]
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=kind(env[var]) if var in env else default,
            help=f"{help} [env {var}; default {default}]",
        )

    opt("host", d.host, "address to listen on")
    opt("port", d.port, "port to listen on", int)
    # No default here, so that a list given alongside --upstreams-file can be refused.
    opt("upstreams", None, f"comma-separated vLLM base URLs (default {','.join(d.upstreams)})")
    opt(
        "upstreams_file",
        None,
        "TOML file of upstreams, reloaded on SIGHUP and when it changes; instead of --upstreams",
    )
    opt("window", d.window, "most requests in flight per upstream (its --max-num-seqs)", int)
    opt(
        "window_mode",
        d.window_mode,
        "adaptive (size the window from measured latency, up to --window) or fixed",
    )
    opt("tasks", None, "task table TOML (default: the shipped one)")
    opt("keys", None, "API keys TOML (plain keys also from GATEWAY_API_KEYS=tenant:key,...)")
    opt("max_body_bytes", d.max_body_bytes, "largest accepted request body", int)
    opt("connect_timeout", d.connect_timeout_s, "upstream connect timeout, seconds", float)
    opt("read_timeout", d.read_timeout_s, "longest silence between stream chunks, seconds", float)
    opt("health_interval", d.health_interval_s, "seconds between upstream health checks", float)
    opt(
        "shutdown_grace",
        d.shutdown_grace_s,
        "on SIGTERM, seconds that started requests may run on before they are cut",
        float,
    )
    opt("access_log", "on" if d.access_log else "off", "JSON access log: on or off")
    opt("log_level", d.log_level, "debug, info, warning or error")
    opt(
        "redis",
        None,
        "Redis URL (redis://host:6379/0) shared by several gateways: global tenant limits "
        "and one window per upstream split between them; default none (all state local)",
    )
    opt(
        "routing",
        d.routing,
        "affinity (a task's requests to the same upstream, for vLLM's prefix cache) or "
        "least-loaded",
    )
    a = p.parse_args(argv)
    if a.upstreams is not None and a.upstreams_file:
        p.error(
            "give --upstreams (UPSTREAMS) or --upstreams-file (GATEWAY_UPSTREAMS_FILE), not both"
        )
    listed = ",".join(d.upstreams) if a.upstreams is None else a.upstreams
    upstreams = tuple(u.strip().rstrip("/") for u in listed.split(",") if u.strip())
    if not upstreams:
        p.error("at least one upstream is required")
    if a.window < 1:
        p.error("--window must be at least 1")
    mode = str(a.window_mode).lower()
    if mode not in ("adaptive", "fixed"):
        p.error("--window-mode must be adaptive or fixed")
    routing = next((r for r in ROUTING_MODES if r == str(a.routing).lower()), None)
    if routing is None:
        p.error(f"--routing must be one of {', '.join(ROUTING_MODES)}")
    if not (math.isfinite(a.shutdown_grace) and a.shutdown_grace >= 0):
        p.error("--shutdown-grace must be a number of seconds, zero or more")
    redis_url = a.redis.strip() if a.redis else None
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        p.error("--redis must be a redis://, rediss:// or unix:// URL")
    return Settings(
        host=a.host,
        port=a.port,
        upstreams=upstreams,
        window=a.window,
        window_mode="fixed" if mode == "fixed" else "adaptive",
        tasks_path=Path(a.tasks) if a.tasks else None,
        keys_path=Path(a.keys) if a.keys else None,
        env_keys=env.get("GATEWAY_API_KEYS"),
        max_body_bytes=a.max_body_bytes,
        connect_timeout_s=a.connect_timeout,
        read_timeout_s=a.read_timeout,
        health_interval_s=a.health_interval,
        shutdown_grace_s=a.shutdown_grace,
        access_log=str(a.access_log).lower() in ("on", "1", "true", "yes"),
        log_level=a.log_level,
        redis_url=redis_url or None,
        upstreams_file=Path(a.upstreams_file) if a.upstreams_file else None,
        routing=routing,
    )

"""The link to Redis, where several gateways keep what they must agree on (``--redis URL``).

Without ``--redis`` nothing here runs and every gateway keeps its state in its own process.
With it, gateways pointing at one Redis share their tenants' limits (:mod:`gateway.shared_limits`)
and split each upstream's window between them (:mod:`gateway.leases`). This module owns the
connection and two rules every shared counter follows:

- **Redis is a helper, never a dependency of an answer.** Every call has a short timeout; the
  first failure (a refused or broken connection, or a timeout that a probe right after
  confirms) marks the link down (logged once, ``gateway_redis_up 0``), and from then on the
  callers get ``None`` at once and serve on local state, with no per-request timeout, until
  the background loop reaches Redis again (then ``gateway_redis_up 1``, logged, and the
  callers' ``on_up`` hooks write this gateway's counts back). No request gets a 5xx because
  of Redis.
- **A gateway's share expires with it.** Each gateway writes its own counts (slots held, a
  tenant's requests in progress) as fields named by its id in shared hashes, and keeps a
  liveness entry (a sorted set scored by expiry, renewed every second and by every call). Each
  script first purges gateways whose entry expired, with their fields: a SIGKILLed gateway's
  slots and counts come back within ``ttl_s``. Counts are written as absolute values, not
  increments, so a lost or reordered write is repaired by the next one.

Scripts take Redis' own ``TIME``, so gateways' clocks need not agree. They touch keys built
from arguments, so this needs one Redis (a primary with replicas or Sentinel is fine), not a
Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

log = logging.getLogger("gateway.shared")

#: Every key the gateway writes starts with this (one Redis may serve other things too).
PREFIX = "qwen-gateway:"

#: A Lua prelude every script starts with: ``now`` (ms, Redis' clock), the purge of expired
#: gateways and the renewal of the caller's own liveness. ARGV[1] is the prefix, ARGV[2] the
#: caller's id, ARGV[3] the liveness TTL in ms; a script's own arguments start at ARGV[4].
PRELUDE = """
local P, gw, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = P .. 'gateways'
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', now, 'LIMIT', 0, 16)) do
  local owned = P .. 'owned:' .. dead
  for _, key in ipairs(redis.call('SMEMBERS', owned)) do redis.call('HDEL', key, dead) end
  redis.call('DEL', owned)
  redis.call('ZREM', alive, dead)
end
redis.call('ZADD', alive, now + ttl, gw)
local function own(key) redis.call('SADD', P .. 'owned:' .. gw, key) end
"""

#: Renew the caller's liveness (the heartbeat): the prelude alone.
_HEARTBEAT = PRELUDE + "return 1\n"


def gateway_id() -> str:
    """Unique per process and readable in Redis: host, PID and a random suffix (a PID is
    reused by a restarted container)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RedisLink:
    """The gateway's one connection pool to Redis, and whether Redis is reachable.

    ``on_change(up)`` is told every change of reachability (for the gauge); hooks added with
    :meth:`on_up` run after each reconnection, to write this gateway's counts back, and those
    added with :meth:`on_down` when Redis is lost.
    """

    def __init__(
        self,
        url: str,
        *,
        on_change: Callable[[bool], None],
        timeout_s: float = 2.0,
        ttl_s: float = 5.0,
        heartbeat_s: float = 1.0,
        ident: str | None = None,
    ) -> None:
        self.ident = ident or gateway_id()
        self.ttl_s = ttl_s
        self.up = False
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No client-side retries: a failure means "serve locally now", and the background
            # loop is the retry.
            retry=Retry(NoBackoff(), 0),
        )
        self._timeout_s = timeout_s
        self._heartbeat_s = heartbeat_s
        self._on_change = on_change
        self._on_up: list[Callable[[], Any]] = []
        self._on_down: list[Callable[[], None]] = []
        self._heartbeat = self.script(_HEARTBEAT)
        self._probe: asyncio.Task[None] | None = None

    def script(self, body: str) -> AsyncScript:
        """Register a Lua script (it should start with :data:`PRELUDE`); redis-py loads it
        again by itself after a Redis restart."""
        return self._client.register_script(body)

    def on_up(self, hook: Callable[[], Any]) -> None:
        """Run ``hook`` (a coroutine function or a plain one) after each reconnection."""
        self._on_up.append(hook)

    def on_down(self, hook: Callable[[], None]) -> None:
        self._on_down.append(hook)

    async def call(self, script: AsyncScript, args: Sequence[str | int | float]) -> Any:
        """Run ``script`` with the prelude's arguments and ``args``; None if Redis is down or
        the call fails (the caller then uses its local state)."""
        if not self.up:
            return None
        full = (PREFIX, self.ident, int(self.ttl_s * 1000), *args)
        try:
            # The client's socket timeouts bound the call. Straight EVALSHA, not the script
            # object nor an asyncio.timeout around it: 15% of the gateway's CPU per call.
            try:
                return await self._client.evalsha(script.sha, 0, *full)
            except NoScriptError:  # Redis restarted (scripts are not kept): load it again
                await self._client.script_load(script.script)
                return await self._client.evalsha(script.sha, 0, *full)
        except ResponseError as exc:  # a script error: our bug, not an outage
            log.error("a Redis script failed (serving on local state): %s", exc)
            return None
        except (RedisTimeout, TimeoutError) as exc:
            self._suspect(exc)
            return None
        except (RedisError, OSError) as exc:
            self._down(exc)
            return None

    def _suspect(self, exc: BaseException) -> None:
        """A call timed out: this call goes local, and a probe decides whether Redis is down.

        A timeout alone is no verdict: on a loaded host the gateway's own event loop can stall
        past the timeout (seen in CI, two cores running vLLM: two false outages in 12 s
        flipped both gateways to their whole windows). A probe sent after the stall answers
        at once if Redis is fine; if it times out too, Redis is down.
        """
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._check(exc), name="redis-probe")

    async def _check(self, first: BaseException) -> None:
        try:
            await self._heartbeat(args=(PREFIX, self.ident, int(self.ttl_s * 1000)))
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)
        else:
            log.info("a Redis call timed out (%s) but Redis answers: still shared", first)

    async def run(self) -> None:
        """Renew this gateway's liveness while Redis is up; reconnect when it is not. Cancel
        to stop."""
        while True:
            if self.up:
                await self.call(self._heartbeat, ())
            else:
                await self._reconnect()
            await asyncio.sleep(self._heartbeat_s)

    async def close(self) -> None:
        """Give this gateway's shares back at once (rather than after the TTL), then close."""
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self.up:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await self.script(_LEAVE)(args=(PREFIX, self.ident, 0))
        await self._client.aclose()

    async def _reconnect(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._heartbeat(args=(PREFIX, self.ident, int(self.ttl_s * 1000)))
        except (RedisError, OSError, TimeoutError):
            return
        self.up = True
        log.info("Redis is reachable: sharing limits and windows with the other gateways")
        self._on_change(True)
        for hook in self._on_up:
            result = hook()
            if asyncio.iscoroutine(result):
                await result

    def _down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        log.warning(
            "Redis is unreachable (%s): serving on this gateway's own limits and windows "
            "until it is back",
            exc or type(exc).__name__,
        )
        self._on_change(False)
        for hook in self._on_down:
            hook()


#: Leave at once: expire the caller now, so the prelude of this very call purges it.
_LEAVE = """
local P, gw = ARGV[1], ARGV[2]
local owned = P .. 'owned:' .. gw
for _, key in ipairs(redis.call('SMEMBERS', owned)) do redis.call('HDEL', key, gw) end
redis.call('DEL', owned)
redis.call('ZREM', P .. 'gateways', gw)
return 1
"""

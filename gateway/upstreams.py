"""The upstream vLLM servers: where they are, which model they serve, whether they are up.

A background loop polls each upstream's ``/health`` and ``/v1/models``. A busy vLLM on a
loaded CPU can be slow to answer, so the loop marks an upstream down only after
``FAILURES_TO_DOWN`` failed checks in a row; a refused connection on a real request marks it
down at once (passive check), and the loop brings it back. Changes are
reported through one callback, so this module knows nothing of windows or metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.upstream import UpstreamClient, UpstreamUnavailable

log = logging.getLogger("gateway.upstreams")

FAILURES_TO_DOWN = 3
CHECK_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Upstream:
    """``name`` (host:port) is the metric label; ``model`` is the served model's id."""

    name: str
    base_url: str
    model: str | None = None
    up: bool = False
    last_error: str | None = None
    failures: int = 0


def upstream_name(base_url: str) -> str:
    return base_url.split("://", 1)[-1].rstrip("/")


class Upstreams:
    def __init__(
        self,
        urls: Iterable[str],
        client: UpstreamClient,
        on_change: Callable[[Upstream], None],
        interval_s: float = 2.0,
    ) -> None:
        self.by_name = {
            upstream_name(url): Upstream(upstream_name(url), url.rstrip("/")) for url in urls
        }
        self._client = client
        self._on_change = on_change
        self._interval_s = interval_s

    def __getitem__(self, name: str) -> Upstream:
        return self.by_name[name]

    def any_up(self) -> bool:
        return any(u.up for u in self.by_name.values())

    def models(self) -> list[str]:
        return sorted({u.model for u in self.by_name.values() if u.model})

    async def run(self) -> None:
        """Poll forever (cancel to stop); quickly until the first upstream is up."""
        while True:
            await self.check_all()
            await asyncio.sleep(self._interval_s if self.any_up() else min(self._interval_s, 0.5))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.by_name.values()))

    async def check(self, upstream: Upstream) -> None:
        timeout = CHECK_TIMEOUT_S
        try:
            status, _ = await self._client.get(f"{upstream.base_url}/health", timeout)
            if status != 200:
                raise UpstreamUnavailable(f"/health answered {status}")
            status, body = await self._client.get(f"{upstream.base_url}/v1/models", timeout)
            model = _first_model(body) if status == 200 else None
            if model is None:
                raise UpstreamUnavailable(f"/v1/models answered {status} without a model")
        except UpstreamUnavailable as exc:
            upstream.failures += 1
            if upstream.failures >= FAILURES_TO_DOWN or not upstream.up:
                self.mark(upstream, up=False, error=exc.message)
            return
        upstream.model = model
        upstream.failures = 0
        self.mark(upstream, up=True)

    def mark(self, upstream: Upstream, *, up: bool, error: str | None = None) -> None:
        upstream.last_error = error
        if upstream.up == up:
            return
        upstream.up = up
        if up:
            log.info("upstream %s is up, serving %s", upstream.name, upstream.model)
        else:
            log.warning("upstream %s is down: %s", upstream.name, error)
        self._on_change(upstream)


def _first_model(body: bytes) -> str | None:
    try:
        data = json.loads(body).get("data") or []
        model = data[0].get("id")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None
    return model if isinstance(model, str) else None

"""vLLM's own view of its load, read from its Prometheus ``/metrics`` page.

A gateway counts only the requests it sent itself. When several gateways share one vLLM,
each needs the upstream's real load: a background loop reads ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` from each upstream every
interval and reports them through one callback (the runtime turns them into the dispatch
window's ``external`` load and into gauges), so this module knows nothing of windows or
metrics. Each reading also notes how many requests were ours at that moment, so that
:attr:`VllmLoad.others` is the load other clients put on the upstream: counting our own
requests in a reading up to an interval old would hold the window shut after they finish.

Without Redis the window gets :attr:`VllmLoad.external` (with leases, the latest ``others``:
:meth:`gateway.tickets.Window.see_others`), the peak of ``others`` over the last ``HOLD_S``
seconds, each reading counting until the next one (so a slow or failed scrape does not
shorten the span): a slot another client frees counts as free once it has stayed free that
long. That client usually refills it at once (its next request was waiting for the slot),
but vLLM's gauge shows the gap until the new request is scheduled. Seen here: a gateway
trusting single readings sent its own batch into the gap between two rounds of another
gateway's batch (vLLM's gauge said 0 of its 2), filling vLLM for a whole generation.

A failed scrape keeps the last reading; a reading older than ``STALE_INTERVALS`` intervals
(and at least ``STALE_MIN_S``) is dropped (reported as ``None``) so that a vLLM whose metrics
cannot be read never holds the window shut on an old number. A busy vLLM is slow to answer,
not gone (its metrics page took over a second here, on two cores): dropping its load after
one or two slow answers would make it look empty exactly when it is full.

The parser reads just enough of Prometheus' text exposition format for this: comments,
label sets (quoted values may hold ``}``, ``,``, spaces and escaped quotes), special values
(``NaN``, ``+Inf``) and an optional timestamp. A malformed line is skipped, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from gateway.outbound import UpstreamClient, UpstreamUnavailable
from gateway.upstreams import Upstream

log = logging.getLogger("gateway.scrape")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"  # a ratio (1.0 = full) despite the name
#: Inter-token latency histogram: its sum and count are the decode time and tokens of every
#: request vLLM ran, cumulative (the adaptive window reads their differences).
DECODE_S = "vllm:inter_token_latency_seconds_sum"
DECODE_TOKENS = "vllm:inter_token_latency_seconds_count"
_WANTED = (RUNNING, WAITING, KV_CACHE, DECODE_S, DECODE_TOKENS)

#: Readings older than this many intervals, and this many seconds, no longer count.
STALE_INTERVALS = 3
STALE_MIN_S = 10.0
#: How long a slot another client freed must stay free before it counts as free.
HOLD_S = 2.0


class ScrapeFailed(Exception):
    """The metrics page could not be read or lacks vLLM's scheduler gauges."""


@dataclass(frozen=True, slots=True)
class VllmLoad:
    """One reading of an upstream's load. ``at`` is the scraper's clock (event-loop seconds).

    Counts are summed over vLLM's series (one per engine); the KV cache usage is the fullest
    engine's, as a sum of ratios means nothing. ``kv_cache_usage`` is None if not exported.
    ``ours`` is how many of the upstream's requests this gateway had in flight when it read;
    ``held`` is the peak of :attr:`others` in the recent readings before this one.
    ``decode_s`` and ``decode_tokens``: the inter-token latency histogram's sum and count,
    summed over engines (None if not exported).
    """

    running: float
    waiting: float
    kv_cache_usage: float | None
    at: float
    ours: int = 0
    held: int = 0
    decode_s: float | None = None
    decode_tokens: float | None = None

    @property
    def requests(self) -> int:
        """Requests the upstream holds, running plus waiting, from every client."""
        return max(round(self.running + self.waiting), 0)

    @property
    def others(self) -> int:
        """Requests other clients (other gateways) held there at this reading."""
        return max(self.requests - self.ours, 0)

    @property
    def external(self) -> int:
        """What the window keeps free for other clients: the recent peak, so a slot another
        client frees and refills between two readings is not taken."""
        return max(self.others, self.held)


def parse_line(line: str) -> tuple[str, float] | None:
    """``(name, value)`` of one sample line, or None for comments, blanks and garbage.

    >>> parse_line('vllm:num_requests_running{engine="0",model_name="a}b"} 3.0 1712345678')
    ('vllm:num_requests_running', 3.0)
    """
    line = line.strip()
    if not line or line[0] == "#":
        return None
    end = 0
    while end < len(line) and line[end] not in "{ \t":
        end += 1
    name, rest = line[:end], line[end:].lstrip()
    if not name:
        return None
    if rest.startswith("{"):
        close = _labels_end(rest)
        if close < 0:
            return None
        rest = rest[close:]
    fields = rest.split()
    if not fields:
        return None
    try:
        return name, float(fields[0])  # float() reads NaN, +Inf and -Inf as Go writes them
    except ValueError:
        return None


def _labels_end(text: str) -> int:
    """Index just after the ``}`` closing the label set that ``text`` starts with, or -1."""
    quoted = False
    i = 1
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1  # the escaped character cannot end the value
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "}":
            return i + 1
        i += 1
    return -1


def read_load(text: str, at: float, ours: int = 0) -> VllmLoad:
    """The load in a vLLM metrics page. Raises ScrapeFailed if the scheduler gauges are absent."""
    values: dict[str, list[float]] = {name: [] for name in _WANTED}
    for line in text.splitlines():
        if not line.startswith(_WANTED):  # cheap filter: the page has hundreds of lines
            continue
        sample = parse_line(line)
        if sample is not None and sample[0] in values and not math.isnan(sample[1]):
            values[sample[0]].append(sample[1])
    if not values[RUNNING] or not values[WAITING]:
        raise ScrapeFailed(f"the metrics page has no {RUNNING} and {WAITING}")
    kv, decode_s, decode_tokens = values[KV_CACHE], values[DECODE_S], values[DECODE_TOKENS]
    return VllmLoad(
        sum(values[RUNNING]),
        sum(values[WAITING]),
        max(kv) if kv else None,
        at,
        ours,
        decode_s=sum(decode_s) if decode_s else None,
        decode_tokens=sum(decode_tokens) if decode_tokens else None,
    )


class Scraper:
    """Reads every upstream's load each ``interval_s`` and reports it to ``on_load``.

    ``on_load(name, load)`` gets each fresh reading, and ``None`` once an upstream's last
    reading has gone stale. ``clock`` must be the clock the caller compares ``load.at`` with.
    ``ours(name)`` is how many requests this gateway has in flight there now; it is read
    before and after each scrape and the larger count is taken, because vLLM's gauge was set
    somewhere in between, and counting a request of ours as another client's would keep a
    slot closed until the next reading (counting too few only lets vLLM queue briefly).
    ``settle(name)``, if given, is awaited between the reading and the second count: with
    Redis, a lease sync, so that the other gateways' slots counted in ``ours`` are not older
    than the reading (a gateway that dispatched since this one last synced would otherwise
    be read as another client, and that peak held for :data:`HOLD_S`).
    """

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        client: UpstreamClient,
        on_load: Callable[[str, VllmLoad | None], None],
        interval_s: float,
        clock: Callable[[], float],
        ours: Callable[[str], int] = lambda name: 0,
        settle: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self._urls = {u.name: f"{u.base_url}/metrics" for u in upstreams}
        self._client = client
        self._on_load = on_load
        self._interval_s = interval_s
        self._timeout_s = min(5.0, max(2.0, 2 * interval_s))
        self._stale_s = max(STALE_INTERVALS * interval_s, STALE_MIN_S)
        self._clock = clock
        self._ours = ours
        self._settle = settle
        #: The last good reading per upstream (None: none yet, or gone stale).
        self.loads: dict[str, VllmLoad | None] = dict.fromkeys(self._urls)
        #: (at, others) of the readings that :attr:`VllmLoad.held` is the peak of.
        self._recent: dict[str, deque[tuple[float, int]]] = {name: deque() for name in self._urls}
        #: Why the last scrape of an upstream failed; absent when it succeeded.
        self.errors: dict[str, str] = {}

    def add(self, upstream: Upstream) -> None:
        """Read a new upstream's metrics from the next round on."""
        self._urls[upstream.name] = f"{upstream.base_url}/metrics"
        self.loads[upstream.name] = None
        self._recent[upstream.name] = deque()

    def remove(self, name: str) -> None:
        """Forget a drained upstream; a scrape of it under way is then ignored."""
        self._urls.pop(name, None)
        self.loads.pop(name, None)
        self._recent.pop(name, None)
        self.errors.pop(name, None)

    async def run(self) -> None:
        """Scrape forever (cancel to stop)."""
        while True:
            try:
                await self.scrape_all()
            except Exception:  # a bug in a callback must not end the loop: log it, go on
                log.exception("scraping upstream metrics failed")
            await asyncio.sleep(self._interval_s)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(name) for name in self._urls))

    async def scrape(self, name: str) -> None:
        url = self._urls.get(name)
        if url is None:
            return  # removed since the round began
        before = self._ours(name)
        try:
            status, body = await self._client.get(url, self._timeout_s)
            if name not in self._urls:
                return  # removed while it was being read: nothing here knows it any more
            if status != 200:
                raise ScrapeFailed(f"/metrics answered {status}")
            if self._settle is not None:
                await self._settle(name)
            ours = max(before, self._ours(name))
            load = read_load(body.decode("utf-8", "replace"), self._clock(), ours)
        except UpstreamUnavailable as exc:
            self._failed(name, exc.message)
            return
        except ScrapeFailed as exc:
            self._failed(name, str(exc))
            return
        if self.errors.pop(name, None) is not None:
            log.info("reading %s's metrics again", name)
        recent = self._recent[name]
        while len(recent) > 1 and load.at - recent[1][0] >= HOLD_S:
            recent.popleft()  # the reading in effect when the span began stays
        load = replace(load, held=max((others for _, others in recent), default=0))
        recent.append((load.at, load.others))
        self.loads[name] = load
        self._on_load(name, load)

    def _failed(self, name: str, why: str) -> None:
        if name not in self._urls:
            return  # removed while it was being read
        if name not in self.errors:  # once per failure streak, not every interval
            log.warning("cannot read %s's metrics, keeping its last load: %s", name, why)
        self.errors[name] = why
        last = self.loads[name]
        if last is not None and self._clock() - last.at > self._stale_s:
            self.loads[name] = None
            self._recent[name].clear()
            self._on_load(name, None)

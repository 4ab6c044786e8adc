"""Each upstream's dispatch window, sized by an adaptive controller from what is measured.

The scheduler dispatches into :class:`~gateway.tickets.Window` objects; this module owns
their ``size``. With ``window_mode = "fixed"`` the size stays at ``--window``; adaptive (the
default) runs one :class:`~gateway.window.WindowController` per upstream with ``--window``
(vLLM's ``--max-num-seqs``) as its ceiling, and ticks it twice a second. Evidence:

- **Time to first token**, per request, measured by serving from dispatch to the first
  event. Each sample is judged against its own task's budget, half its ``sla_ttft_s`` (the
  other half is for the queue): a long document's prefill is not a sentiment label's.
- **Decode pace**, from vLLM's own inter-token latency histogram, read by the metrics
  scraper every health interval: every running request's tokens, at no cost to the
  streaming relay. vLLM decodes its running requests in one batch, so they share one pace,
  and the target is the tightest pace among the requests in flight *now* (:func:`pace_for`):
  a window full of batch work, whose SLA is minutes, may decode slowly; once a chat is among
  them, the window must decode at the chat's pace. A pace target that no request in flight
  needs would shrink the window for nobody's benefit (measured: a fixed chat pace shrank
  the window to 1 under a batch-heavy mix and cut throughput by more than half).

A window that grows wakes the dispatcher (queued work may now go); one that shrinks just
dispatches less until enough requests have finished.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable

from gateway.config import Config, Task
from gateway.tickets import Ticket, Window
from gateway.window import WindowController, WindowSnapshot, WindowTargets
from gateway.window_tuning import WindowMode, WindowTuning

log = logging.getLogger("gateway.sizing")

#: Share of a task's ``sla_ttft_s`` the upstream may take (dispatch to first token); the rest
#: is for waiting in the gateway's queue.
TTFT_SHARE = 0.5
#: How often the controllers decide; faster than their own pacing (growth at most once a
#: second), so a decision is never late by more than this.
TICK_S = 0.5


def ttft_budgets(config: Config) -> dict[str, float]:
    """Each task's time-to-first-token budget at the upstream (dispatch to first event)."""
    return {t.name: TTFT_SHARE * t.sla_ttft_s for t in config.tasks.values()}


def pace_for(task: Task, max_tokens: int) -> float:
    """Seconds per output token a request of ``task`` may take and still meet its latency
    SLA: what is left after its first token's budget, over the tokens after the first.
    Label tasks (a word or two), one-token answers and tasks whose latency SLA leaves
    nothing after the first token's budget have no pace to keep: inf."""
    left = task.sla_latency_s - TTFT_SHARE * task.sla_ttft_s
    if task.labels or max_tokens <= 1 or left <= 0:
        return math.inf
    return left / (max_tokens - 1)


def tuning_for(scrape_interval_s: float) -> WindowTuning:
    """The controller's tuning in a gateway, where decode evidence comes with each scrape.

    Measured on the SLO benchmark (2 cores): starting at 4 and growing cost the first tens
    of seconds of every overload at a window too small for the load, and one slow burst of
    cold prefills at the start shrank the window to 3 and held it there for the 30 s probe
    wait, while realtime requests queued behind it. So a window starts at ``--window``
    (what the operator sized vLLM for) and backs off on evidence; a size that failed is
    probed again after 10 s; silence counts as saturation only after several missed scrapes
    (a busy vLLM is slow to answer one).
    """
    return WindowTuning(stale_s=max(10.0, 4 * scrape_interval_s), probe_wait_s=10.0)


class Sizing:
    """Owns the windows' sizes. Not thread-safe: one event loop owns it.

    ``running()`` lists the dispatched tickets (each with its upstream and ``pace_s``);
    ``on_grow()`` is called when a window grew (the dispatcher's kick)."""

    def __init__(
        self,
        windows: Iterable[Window],
        config: Config,
        *,
        max_size: int,
        mode: WindowMode,
        running: Callable[[], Iterable[Ticket]],
        clock: Callable[[], float],
        on_grow: Callable[[], None],
        scrape_interval_s: float = 2.0,
    ) -> None:
        self._windows: dict[str, Window] = {}
        self._running = running
        self._clock = clock
        self._on_grow = on_grow
        self._budgets = ttft_budgets(config)
        self._max_size = max_size
        self._tuning = tuning_for(scrape_interval_s) if mode == "adaptive" else None
        self.controllers: dict[str, WindowController] = {}
        #: The last reading of each upstream's decode histogram: (at, seconds, tokens).
        self._decode: dict[str, tuple[float, float, float]] = {}
        for window in windows:
            self.add(window)

    def add(self, window: Window) -> None:
        """Size a new upstream's window (from ``--window``, as at the start)."""
        self._windows[window.name] = window
        if self._tuning is not None:
            targets = WindowTargets(ttft_s=min(self._budgets.values()), tpot_s=math.inf)
            ctl = WindowController(
                targets, max_size=self._max_size, initial=self._max_size, tuning=self._tuning
            )
            self.controllers[window.name] = ctl
        window.size = self._max_size

    def remove(self, name: str) -> None:
        """Forget a drained upstream's window and what was measured on it."""
        self._windows.pop(name, None)
        self.controllers.pop(name, None)
        self._decode.pop(name, None)

    def reconfigure(self, config: Config) -> None:
        self._budgets = ttft_budgets(config)
        ttft = min(self._budgets.values())
        for ctl in self.controllers.values():
            ctl.targets = WindowTargets(ttft_s=ttft, tpot_s=ctl.targets.tpot_s)

    def first_token(self, upstream: str, task: str, ttft_s: float) -> None:
        """A request of ``task`` got its first event ``ttft_s`` after it was dispatched."""
        ctl = self.controllers.get(upstream)
        if ctl is None:
            return
        budget = self._budgets.get(task)
        ctl.observe_first_token(
            self._clock(), ttft_s, self._windows[upstream].occupied, budget_s=budget
        )

    def decoded(
        self, upstream: str, at: float, seconds: float | None, tokens: float | None
    ) -> None:
        """The upstream's cumulative inter-token latency (its histogram's sum and count) as
        read at ``at``; the difference from the previous reading is one decode sample."""
        ctl = self.controllers.get(upstream)
        if ctl is None:
            return
        if seconds is None or tokens is None:
            self._decode.pop(upstream, None)
            return
        last = self._decode.get(upstream)
        self._decode[upstream] = (at, seconds, tokens)
        if last is None or tokens < last[2]:  # first reading, or vLLM restarted
            return
        count, spent = round(tokens - last[2]), seconds - last[1]
        if count > 0 and math.isfinite(spent) and spent >= 0:
            occupied = self._windows[upstream].occupied
            ctl.observe_tokens(at, count, spent, occupied, since=last[0])

    def tick(self) -> None:
        """Let every controller decide; wake the dispatcher if a window grew."""
        now, grew = self._clock(), False
        paces: dict[str, float] = {}
        for ticket in self._running():
            if ticket.upstream is not None:
                paces[ticket.upstream] = min(paces.get(ticket.upstream, math.inf), ticket.pace_s)
        for name, ctl in list(self.controllers.items()):
            pace = paces.get(name, math.inf)
            if pace != ctl.targets.tpot_s:
                ctl.targets = WindowTargets(ttft_s=ctl.targets.ttft_s, tpot_s=pace)
            window = self._windows[name]
            old = window.size
            window.size = ctl.tick(now, inflight=window.occupied)
            if window.size != old:
                snap = ctl.snapshot()
                log.info(
                    "window %s: %d -> %d (%s; ttft %s, tpot %s)",
                    name, old, window.size, snap.decision, _fmt(snap.ttft_s), _fmt(snap.tpot_s),
                )  # fmt: skip
            grew = grew or window.size > old
        if grew:
            self._on_grow()

    def snapshots(self) -> dict[str, WindowSnapshot]:
        return {name: ctl.snapshot() for name, ctl in self.controllers.items()}

    async def run(self) -> None:
        """Tick forever (cancel to stop); a fixed window has nothing to do."""
        if self._tuning is None:  # not "no controllers": upstreams may be added later
            return
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not freeze the windows: log it, go on
                log.exception("sizing the dispatch windows failed")
            await asyncio.sleep(TICK_S)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"

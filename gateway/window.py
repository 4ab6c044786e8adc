"""An adaptive dispatch window per upstream: as many requests in flight as still meet the SLA.

Pure logic with an explicit clock (every method takes ``now``), like the scheduler and the
breaker, so it is tested without sleeps. The gateway owns one :class:`WindowController` per
upstream, feeds it what it measures and copies :attr:`WindowController.size` into the
scheduler's :class:`~gateway.scheduler.Window`.

vLLM's ``--max-num-seqs`` is an upper bound, not an operating point: on 2 CPU cores a few
sequences already push time to first token (TTFT) and time per output token (TPOT) past the
SLA, while a GPU meets it with hundreds. So the window is found by measurement, in the spirit
of Netflix's concurrency-limits (AIMD, Gradient2) and Envoy's adaptive concurrency filter, but
on TTFT and TPOT (what the SLA promises) rather than whole-response time, which mostly
measures how long the answer is.

The rules, each decided on a :meth:`WindowController.tick`:

- **Evidence is measured at the current size.** A sample counts only if it was measured
  entirely after the size last changed (a first token whose request was dispatched after the
  change; a token batch that started after it), at no more requests in flight than the
  window (latency at a concurrency above the window says nothing about the window: it is a
  shrink still draining, or other gateways' load), and within the last ``horizon_s`` (or
  else the newest ``min_samples``).
- **Over target: back off.** If the TTFT percentile or the mean TPOT of that evidence (at
  least ``min_samples`` of it) is over its target, multiply the size by ``backoff``, at most
  once per ``cooldown_s``. If the last change was a growth, a single first token over target
  is enough to undo that growth at once (the probe failed). Either way the size that failed
  becomes a *ceiling*.
- **Under target with margin, on a used window: grow** by ``growth`` of the size (at least 1),
  at most once per ``grow_interval_s``. Only samples taken while the window was nearly full
  count here, so an idle window does not open up on latency it was never asked to carry.
- **Near a ceiling, search instead of jumping:** growth goes at most half way to the size just
  under the ceiling, and not past it, for ``probe_wait_s``; then one probe at the ceiling
  itself. A good probe clears the ceiling; a failed one waits twice as long before the next
  (up to ``max_probe_wait_s``), so a cliff costs a short probe now and then, not a sawtooth.
- **Stale counts as saturated.** Requests in flight and no measurement for ``stale_s``: shrink
  as if over target (down to ``min_size`` if it persists). Nothing in flight and nothing
  measured: hold, since an idle upstream says nothing about its capacity.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from gateway.window_tuning import Decision, WindowSnapshot, WindowTargets, WindowTuning


class _Sample(NamedTuple):
    at: float  # when it was observed
    start: float  # when the measured interval began (dispatch, or the batch's first token)
    inflight: int  # requests in flight on the upstream when it was observed
    seconds: float
    tokens: int  # 1 for a TTFT sample


class WindowController:
    """One upstream's adaptive window. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        targets: WindowTargets,
        *,
        max_size: int,
        min_size: int = 1,
        initial: int | None = None,
        tuning: WindowTuning | None = None,
    ) -> None:
        """Start at ``initial`` (default ``min(max_size, 4)``) within ``[min_size, max_size]``.

        ``max_size`` is the upstream's ``--max-num-seqs``: vLLM never runs more at once.
        ``initial`` defaults to 4 because that is safe on a CPU and a GPU leaves it within
        seconds. Usage::

            ctl = WindowController(WindowTargets(ttft_s=1.0, tpot_s=0.1), max_size=256)
            ctl.observe_first_token(now, ttft_s=0.4, inflight=4)    # a stream's first event
            ctl.observe_tokens(now, tokens=20, seconds=1.0, inflight=4)  # its decode progress
            window.size = ctl.tick(now, inflight=window.occupied)   # about once a second

        ``inflight`` is everything running on the upstream (``Window.occupied``, other
        gateways' load included), because that is what the latency depends on.
        """
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        start = min(max_size, max(min_size, 4)) if initial is None else initial
        if not min_size <= start <= max_size:
            raise ValueError(f"initial window {start} outside [{min_size}, {max_size}]")
        self.targets = targets  # replace when the task table changes
        self.tuning = tuning or WindowTuning()
        self.min_size, self.max_size = min_size, max_size
        self._size = start
        cap = self.tuning.max_samples
        self._ttft: deque[_Sample] = deque(maxlen=cap)
        self._tpot: deque[_Sample] = deque(maxlen=cap)
        self._changed_at = -math.inf  # samples before this were measured at another size
        self._shrunk_at = -math.inf
        self._last_sample_at = -math.inf
        self._busy_since: float | None = None  # work continuously in flight since
        self._probe_from: int | None = None  # size before the last change, if it was a growth
        self._ceiling: int | None = None
        self._ceiling_at = -math.inf
        self._probe_wait = self.tuning.probe_wait_s
        self._decision = Decision.START
        self._readings: tuple[float | None, float | None] = (None, None)

    @property
    def size(self) -> int:
        """The window: how many requests may be in flight on the upstream."""
        return self._size

    @property
    def stale_s(self) -> float:
        t = self.tuning
        return t.stale_s if t.stale_s is not None else max(5.0, 3 * self.targets.ttft_s)

    def observe_first_token(
        self, now: float, ttft_s: float, inflight: int, budget_s: float | None = None
    ) -> None:
        """A dispatched request's first streamed event arrived ``ttft_s`` after dispatch.

        ``budget_s`` is the request's own time-to-first-token budget when it is looser than
        the target (a long document's prefill is judged by its task's SLA, not by the
        sentiment label's): the sample counts as ``ttft_s`` scaled to the target. A
        non-streamed answer is not a first token: its wait is the whole generation.
        """
        seconds = ttft_s if budget_s is None else ttft_s * self.targets.ttft_s / budget_s
        self._observe(now, self._ttft, _Sample(now, now - ttft_s, inflight, seconds, 1))

    def observe_tokens(
        self, now: float, tokens: int, seconds: float, inflight: int, since: float | None = None
    ) -> None:
        """``tokens`` were decoded in ``seconds`` of decode time, measured since ``since``.

        One request's batch (``since`` defaults to ``now - seconds``), or the upstream's own
        inter-token latency histogram between two readings (``seconds`` is then the sum over
        every running request, ``since`` the previous reading). Report in short batches
        (about a second each): a batch that started before the window last changed does not
        count, so only short ones let the controller judge a new size quickly.
        """
        if tokens > 0:
            start = now - seconds if since is None else since
            self._observe(now, self._tpot, _Sample(now, start, inflight, seconds, tokens))

    def tick(self, now: float, inflight: int) -> int:
        """Decide, from what was observed, whether to grow, hold or shrink; the new size.

        Call it before dispatching at the same ``now``: requests dispatched at the instant the
        size changes are taken as sent under the new size.
        """
        self._note_busy(now, inflight)
        self._forget(now - self.tuning.horizon_s)
        if self._stalled(now, inflight):
            self._decision = self._shrink(now, Decision.STALE)
        else:
            self._decision = self._decide(now)
        return self._size

    def snapshot(self) -> WindowSnapshot:
        return WindowSnapshot(self._size, self._decision, *self._readings, self._ceiling)

    # -- measurements ----------------------------------------------------------------------

    def _observe(self, now: float, samples: deque[_Sample], sample: _Sample) -> None:
        samples.append(sample)
        self._last_sample_at = max(self._last_sample_at, now)
        # An observation can say work is in flight but not that none is: its count may be
        # taken just after its own request was released. Only a tick clears it.
        if sample.inflight > 0 and self._busy_since is None:
            self._busy_since = now

    def _forget(self, horizon: float) -> None:
        for samples in (self._ttft, self._tpot):
            # Keep the newest few however old: at one request in flight, a CPU may finish
            # fewer than min_samples requests per horizon and would otherwise never decide.
            while len(samples) > self.tuning.min_samples and samples[0].at < horizon:
                samples.popleft()

    def _note_busy(self, now: float, inflight: int) -> None:
        if inflight <= 0:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now

    def _stalled(self, now: float, inflight: int) -> bool:
        if inflight <= 0 or self._busy_since is None:
            return False
        # Silence counts from when work went in flight, not from the last sample before an
        # idle spell: the first request after a quiet minute is not stale.
        return now - max(self._busy_since, self._last_sample_at) >= self.stale_s

    def _evidence(self, samples: deque[_Sample], horizon: float) -> list[_Sample]:
        """The samples measured at the current size: the last ``horizon_s`` of them, or the
        newest ``min_samples`` if that is fewer."""
        # A request dispatched at the very instant of the change counts: the gateway ticks
        # before it dispatches (see tick), so it was sent under the new size.
        fresh = [s for s in samples if s.start >= self._changed_at and s.inflight <= self._size]
        recent = [s for s in fresh if s.at >= horizon]
        return (
            recent if len(recent) >= self.tuning.min_samples else fresh[-self.tuning.min_samples :]
        )

    def _loaded(self, samples: list[_Sample]) -> list[_Sample]:
        floor = math.ceil(self.tuning.used * self._size - 1e-9)
        return [s for s in samples if s.inflight >= floor]

    def _ttft_reading(self, samples: list[_Sample], least: int) -> float | None:
        if not samples or len(samples) < least:
            return None
        return _percentile(sorted(s.seconds for s in samples), self.tuning.quantile)

    def _tpot_reading(self, samples: list[_Sample], least: int) -> float | None:
        if not samples or len(samples) < least:
            return None
        # Weighted by tokens: a long batch says more about the decode rate than a short one.
        return sum(s.seconds for s in samples) / sum(s.tokens for s in samples)

    def _over(self, ttft: float | None, tpot: float | None) -> bool:
        return (ttft is not None and ttft > self.targets.ttft_s) or (
            tpot is not None and tpot > self.targets.tpot_s
        )

    # -- decisions -------------------------------------------------------------------------

    def _decide(self, now: float) -> Decision:
        horizon = now - self.tuning.horizon_s
        ttft, tpot = self._evidence(self._ttft, horizon), self._evidence(self._tpot, horizon)
        # A probe (the size just grown to) is judged on its first first token: stepping back
        # to a size measured good is cheap, staying over target while a CPU completes three
        # more requests is not (and with fewer than ten samples a p90 is their maximum
        # anyway). Decode batches keep min_samples: every stream sends one a second, and a
        # lone short batch (a stream's last token) is too noisy to judge by.
        few = 1 if self._probe_from is not None else self.tuning.min_samples
        self._readings = (
            self._ttft_reading(ttft, few),
            self._tpot_reading(tpot, self.tuning.min_samples),
        )
        if self._over(*self._readings):
            return self._back_off(now)
        if len(self._loaded(ttft)) >= self.tuning.min_samples:
            # The size held up on full evidence from a used window: from now on a slowdown is
            # news about the upstream, answered by the multiplicative cut, not a failed probe.
            self._probe_from = None
        return self._grow(now) if self._may_grow(now, ttft, tpot) else Decision.HOLD

    def _may_grow(self, now: float, ttft: list[_Sample], tpot: list[_Sample]) -> bool:
        if self._size >= self.max_size or now - self._changed_at < self.tuning.grow_interval_s:
            return False
        margin = self.tuning.margin
        loaded_ttft = self._ttft_reading(self._loaded(ttft), self.tuning.min_samples)
        # Decode evidence may lag (streams report in batches), so its absence does not block
        # growth, but any of it that is too slow does.
        loaded_tpot = self._tpot_reading(self._loaded(tpot), least=1)
        return (
            loaded_ttft is not None
            and loaded_ttft <= margin * self.targets.ttft_s
            and (loaded_tpot is None or loaded_tpot <= margin * self.targets.tpot_s)
        )

    def _grow(self, now: float) -> Decision:
        size, limit = self._size, self.max_size
        step = max(1, math.floor(size * self.tuning.growth))
        if self._ceiling is not None and size >= self._ceiling:
            self._ceiling, self._probe_wait = None, self.tuning.probe_wait_s  # it holds now
        elif self._ceiling is not None:
            waiting = now - self._ceiling_at < self._probe_wait
            limit = self._ceiling - 1 if waiting else self._ceiling
            step = min(step, max(1, math.ceil((limit - size) / 2)))
        new = min(size + step, limit)
        if new <= size:
            return Decision.HOLD
        self._change(now, new)
        self._probe_from = size
        return Decision.GROW

    def _back_off(self, now: float) -> Decision:
        good = self._probe_from
        if good is None:
            return self._shrink(now, Decision.SHRINK)
        # The growth we just made put latency over target: undo it now, without waiting for
        # the cooldown (it is a small step back to a size that was measured good).
        failed = self._size
        # Failing again at the same ceiling: wait twice as long before the next probe.
        base, wait = self.tuning.probe_wait_s, self._probe_wait
        again = min(2 * wait, self.tuning.max_probe_wait_s) if self._ceiling == failed else base
        self._set_ceiling(now, failed, wait=again)
        self._change(now, good)
        self._shrunk_at = now
        return Decision.REVERT

    def _shrink(self, now: float, reason: Decision) -> Decision:
        if now - self._shrunk_at < self.tuning.cooldown_s:
            return Decision.HOLD
        new = max(self.min_size, math.floor(self._size * self.tuning.backoff))
        if new >= self._size:
            return Decision.HOLD  # already at the floor
        if reason is Decision.SHRINK:
            # Only a measured failure is a ceiling: silence says nothing about capacity (a
            # restarting upstream), and once it speaks again the window should regrow fast.
            self._set_ceiling(now, self._size, wait=self.tuning.probe_wait_s)
        self._change(now, new)
        self._shrunk_at = now
        return reason

    def _set_ceiling(self, now: float, ceiling: int, wait: float) -> None:
        self._ceiling, self._ceiling_at, self._probe_wait = ceiling, now, wait

    def _change(self, now: float, size: int) -> None:
        self._size, self._changed_at, self._probe_from = size, now, None


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty list."""
    return ordered[min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)]


__all__ = ["Decision", "WindowController", "WindowSnapshot", "WindowTargets", "WindowTuning"]

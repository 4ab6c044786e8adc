"""Fair shares of the model between the tenants of one class: a Virtual Token Counter.

After VTC ("Fairness in Serving Large Language Models", Sheng et al., OSDI 2024). A request
is not a unit of work for an LLM: a tenant sending 2,000-token generations and one sending
50-token ones would get the same number of turns from a round robin, and the first about 40
times the model's time. So each tenant of a class has a *virtual counter*: the service it
has received, in tokens, divided by its weight::

    service = prompt tokens x input_weight + generated tokens x output_weight

and the class's next slot goes to the waiting tenant with the least counter. Service is
charged as it happens (the prompt at dispatch, generated tokens while they stream, see
:class:`Meter`), so a long generation cannot hide its cost until it ends.

What a running request is still expected to generate (its ``max_tokens``) is *reserved*
against its tenant while it runs, and turned into service token by token as it streams; what
is left is released when it ends. Without the reservation a tenant's counter would not show
a 300-token generation it just started, and it could take every free slot at once before
its counter caught up (measured on vLLM: four long requests dispatched in a row, then the
other tenant starved for seconds). The reservation counts only for the order, never as
service.

A tenant that was idle does not bank its idle time: when it becomes *active* again (it had
nothing queued or running in the class, and a new request arrives) its counter is lifted to
the class's *floor*, the least counter among the tenants active at that moment (or, when
none is, where the last one left off). From there it competes as an equal.

Memory is bounded by the tenants, which come from the keys file. A tenant that leaves with a
counter at or below the floor is forgotten: it would be lifted to the floor anyway. Without
keys there is one tenant, ``""``, and nothing is counted at all.

``mode = "requests"`` orders by requests served instead (one per request, over the weight):
the old round robin, weighted. Service in tokens is still counted for the metrics, so both
modes can be compared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

#: What the counters count: ``tokens`` (the default) or ``requests``.
MODES = ("tokens", "requests")

#: Seconds of service the shares and Jain's index look back over, in six slices.
WINDOW_S = 60.0

#: Events read from a stream before they are charged: one charge per this many tokens keeps
#: the relay's per-batch cost to a byte count (see :class:`Meter`).
FLUSH_EVENTS = 16


@dataclass(frozen=True, slots=True)
class FairnessPolicy:
    """How tenants of one class share the model (the task table's ``[fairness]`` section).

    ``FairnessPolicy(mode="tokens", input_weight=1, output_weight=2)``: a generated token
    costs twice a prompt token (decoding is what holds a slot).
    """

    mode: str = "tokens"
    input_weight: float = 1.0
    output_weight: float = 2.0

    def service(self, prompt_tokens: float, output_tokens: float) -> float:
        return prompt_tokens * self.input_weight + output_tokens * self.output_weight


def estimate_prompt_tokens(*texts: str) -> int:
    """A low estimate of the tokens a prompt's texts make, before vLLM counts them.

    Four UTF-8 bytes per token is about English text with Qwen's tokenizer and below it for
    Chinese (three bytes a character, about one token each); the chat template is not
    counted. Kept low on purpose: the exact count from the answer's usage only ever adds
    (see :meth:`Meter.settle`), so service counters and metrics never go down."""
    return sum(len(text.encode()) for text in texts) // 4


@dataclass(slots=True)
class _Bucket:
    """One slice of the sliding window: service per tenant, and who had work waiting."""

    start: float
    service: dict[str, float] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)


class Ledger:
    """The virtual counters, activity and recent service of one class's tenants."""

    def __init__(self, window_s: float = WINDOW_S, buckets: int = 6) -> None:
        self._counters: dict[str, float] = {}
        self._reserved: dict[str, float] = {}  # expected service of running requests
        self._active: dict[str, int] = {}  # tickets queued or running, per tenant
        self._floor = 0.0  # never decreases: where a returning tenant starts
        self.served: dict[str, float] = {}  # service in weighted tokens since start (metrics)
        self._weights: dict[str, float] = {}  # the last weight each tenant was charged at
        self._width = window_s / buckets
        self._window: deque[_Bucket] = deque(maxlen=buckets)

    def counter(self, tenant: str) -> float:
        """The order between tenants: service over weight, plus what is reserved."""
        return self._counters.get(tenant, self._floor) + self._reserved.get(tenant, 0.0)

    def reserve(self, tenant: str, amount: float) -> None:
        """Hold ``amount`` (counter units) against the tenant: a request just started."""
        if tenant and amount > 0:
            self._reserved[tenant] = self._reserved.get(tenant, 0.0) + amount

    def unreserve(self, tenant: str, amount: float) -> None:
        """Let go of ``amount`` of the tenant's reservation (used, or no longer needed)."""
        left = self._reserved.get(tenant, 0.0) - amount
        if left > 1e-9:
            self._reserved[tenant] = left
        else:
            self._reserved.pop(tenant, None)

    def join(self, tenant: str, *, returning: bool) -> None:
        """A ticket of ``tenant`` became active (queued). ``returning``: it was active a
        moment ago (paused, or failing over), so it keeps its counter as it is."""
        if not tenant:
            return
        count = self._active.get(tenant, 0)
        if count == 0 and not returning:
            self._floor = max(self._floor, self._least_active())
            self._counters[tenant] = max(self._counters.get(tenant, self._floor), self._floor)
        self._active[tenant] = count + 1

    def leave(self, tenant: str) -> None:
        """A ticket of ``tenant`` is no longer active (done, shed, expired, withdrawn)."""
        count = self._active.get(tenant, 0)
        if count <= 0:
            return
        if count > 1:
            self._active[tenant] = count - 1
            return
        # The floor moves up to the least active counter before the tenant goes, so a class
        # that empties remembers where its last tenant left off.
        self._floor = max(self._floor, self._least_active())
        del self._active[tenant]
        if self._counters.get(tenant, self._floor) <= self._floor:
            self._counters.pop(tenant, None)  # it would be lifted to the floor anyway

    def charge(
        self,
        tenant: str,
        policy: FairnessPolicy,
        prompt: float,
        output: float,
        requests: int,
        weight: float,
        now: float,
    ) -> None:
        """Charge tokens (and, at dispatch, one request) to the tenant: its counter grows by
        what the policy's mode counts, over its weight; what it was served, by the tokens."""
        if not tenant:
            return
        service = policy.service(prompt, output)
        order = requests if policy.mode == "requests" else service
        if order:
            self._counters[tenant] = self._counters.get(tenant, self._floor) + order / weight
        if service:
            self.served[tenant] = self.served.get(tenant, 0.0) + service
            bucket = self._bucket(now)
            bucket.service[tenant] = bucket.service.get(tenant, 0.0) + service
            self._weights[tenant] = weight

    def waiting(self, tenants: Iterable[str], now: float) -> None:
        """These tenants had work waiting in the class (they wanted more than they got)."""
        bucket: _Bucket | None = None
        for tenant in tenants:
            if tenant:
                bucket = bucket or self._bucket(now)
                bucket.waiting.add(tenant)

    def shares(self, now: float) -> dict[str, float]:
        """Each tenant's fraction of the class's service in the window (empty: none)."""
        service = self._recent(now)[0]
        total = sum(service.values())
        return {t: s / total for t, s in sorted(service.items())} if total > 0 else {}

    def fairness_index(self, now: float) -> float:
        """Jain's index of the weighted service of the tenants that had work waiting in the
        window: 1 when they were served equally (by weight), 1/n when one got everything.
        1 when fewer than two tenants contended: nobody was treated unfairly."""
        service, waiting = self._recent(now)
        xs = [service.get(t, 0.0) / self._weights.get(t, 1.0) for t in waiting]
        if len(xs) < 2 or not any(xs):
            return 1.0
        return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))

    def tenants(self) -> int:
        """Tenants this ledger holds a counter for (bounded by the keys file)."""
        return len(self._counters)

    def _least_active(self) -> float:
        counters, floor = self._counters, self._floor
        return min((counters.get(t, floor) for t in self._active), default=floor)

    def _bucket(self, now: float) -> _Bucket:
        if not self._window or now >= self._window[-1].start + self._width:
            self._window.append(_Bucket(now))  # the oldest falls out (maxlen)
        return self._window[-1]

    def _recent(self, now: float) -> tuple[dict[str, float], set[str]]:
        horizon = now - self._width * (self._window.maxlen or 1)
        service: dict[str, float] = {}
        waiting: set[str] = set()
        for bucket in self._window:
            if bucket.start >= horizon:
                for tenant, amount in bucket.service.items():
                    service[tenant] = service.get(tenant, 0.0) + amount
                waiting |= bucket.waiting
        return service, waiting


class Meter:
    """Charges one upstream call's tokens to its tenant while the answer streams.

    The relay hands it every batch of events (:meth:`batch`): it counts ``data:`` events
    (vLLM streams one per generated token), a byte search that costs well under a microsecond,
    and charges every :data:`FLUSH_EVENTS` of them. When the call ends its usage is known,
    and :meth:`settle` charges what the estimates missed: the prompt beyond its estimate,
    tokens beyond the events. It never takes back (a service counter that went down would
    break the metric, a Prometheus counter), so the estimates stay low: the last batch, with
    the finish, usage and ``[DONE]`` events, is left to :meth:`settle`, and what is flushed
    before it overshoots by at most the role event at the start of a chat stream.
    """

    __slots__ = ("_before", "_charge", "_output", "_pending", "_prompt")

    def __init__(
        self,
        charge: Callable[[float, float], None],
        prompt_charged: float,
        before: tuple[int, int] = (0, 0),
    ) -> None:
        """``charge(prompt tokens, output tokens)``; ``prompt_charged``: the estimate charged
        at dispatch; ``before``: the request's (prompt, output) tokens from earlier steps,
        which :meth:`settle`'s totals include."""
        self._charge = charge
        self._pending = 0
        self._prompt = prompt_charged
        self._output = 0
        self._before = before

    def batch(self, batch: bytes) -> None:
        if batch.endswith(b"data: [DONE]\n\n"):
            return  # the end: settled from the usage
        self._pending += batch.count(b"data: ")
        if self._pending >= FLUSH_EVENTS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, 0
            self._output += pending
            self._charge(0.0, float(pending))

    def settle(self, prompt_tokens: int | None, output_tokens: int | None) -> None:
        """The request's exact counts so far (None: not known): charge what is missing."""
        if output_tokens is None:
            self.flush()  # the events are all there is
        self._pending = 0
        prompt = max((prompt_tokens or 0) - self._before[0] - self._prompt, 0.0)
        output = max((output_tokens or 0) - self._before[1] - self._output, 0)
        self._prompt += prompt
        self._output += output
        if prompt or output:
            self._charge(prompt, float(output))

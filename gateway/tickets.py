"""The scheduler's vocabulary: a request's ticket, an upstream's window, and the decisions
(admit, reject, dispatch, preempt, expire) the scheduler hands back. Plain values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from gateway.classes import ClassPolicy


class State(Enum):
    NEW = "new"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DONE = "done"
    EXPIRED = "expired"
    SHED = "shed"
    WITHDRAWN = "withdrawn"


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place in the scheduler. Identity matters: tickets compare by ``is``.

    ``need_s`` is the least time the request needs before its deadline to be worth sending
    (e.g. the task's observed time to first token); once less than that remains it expires.
    ``avoid`` names upstreams that already failed it (failover): it goes to one of them only
    when no other upstream is usable, so it can never wait for an upstream that went away.

    ``late_at`` is when it can no longer make its SLA's time to first token: from then on it
    waits behind every request that still can (``penalty_s`` moves its key back). A ticket
    that ``started`` (its answer began) and was paused ages afresh from the pause. With
    ``refuse_late`` it is refused instead (expiry stage ``"sla"``) as soon as too little time
    is left to get its first token by ``late_at`` (``need_s`` before it): a stream's SLA is its
    time to first token, and an answer that starts late misses it however fast it runs.
    """

    task: str
    policy: ClassPolicy
    arrival: float
    queue_deadline: float
    deadline: float
    need_s: float = 0.0
    pace_s: float = math.inf  # seconds per output token its SLA needs (gateway.sizing)
    tenant: str = ""
    prompt_tokens: int = 1  # estimated, charged to the tenant at dispatch (gateway.fairness)
    output_tokens: int = 0  # at most this many generated: reserved for its tenant while it runs
    reserved: float = 0.0  # what is left of that reservation (counter units)
    late_at: float = math.inf
    late: bool = False  # demoted: waits behind every ticket that can still make its SLA
    refuse_late: bool = False  # refused (429) rather than demoted once it cannot make late_at
    penalty_s: float = 0.0  # added to its key: a late ticket's demotion, a paused one's restart
    started: bool = False  # its answer began (the first byte came back)
    avoid: frozenset[str] = frozenset()
    preemptible: bool = False  # the request can be paused and resumed (see gateway.serving)
    preemptions: int = 0
    preempting: bool = False  # asked to pause; its slot is still taken until it is released
    state: State = State.NEW
    seq: int = -1
    upstream: str | None = None
    dispatched_at: float | None = None
    effective_priority: float = 0.0
    boosted: bool = False

    @property
    def key(self) -> float:
        """Queue order: smaller goes first. Equal to ``now - effective_priority(now)``, less
        the penalty of a late or paused ticket."""
        return self.arrival - self.policy.head_start_s + self.penalty_s

    @property
    def reclaimable(self) -> bool:
        """Its slot can be taken back for more important work (it may be preempted again)."""
        return self.preemptible and self.preemptions < self.policy.max_preemptions

    @property
    def expires_at(self) -> float:
        at = min(self.queue_deadline, self.deadline - self.need_s)
        return min(at, self.late_at - self.need_s) if self.refuse_late else at

    @property
    def expiry_stage(self) -> str:
        """Why it expired: it can no longer make its SLA (``"sla"``, a refusal), its queue
        deadline passed, or too little budget is left to be worth sending."""
        budget = self.deadline - self.need_s
        if self.refuse_late and self.late_at - self.need_s <= min(self.queue_deadline, budget):
            return "sla"
        return "queue" if self.queue_deadline <= budget else "dispatch"


@dataclass(frozen=True, slots=True)
class Admitted:
    """The ticket is queued. ``shed`` lists queued tickets evicted to make room for it."""

    shed: tuple[Ticket, ...] = ()


@dataclass(frozen=True, slots=True)
class Rejected:
    """The ticket was not queued. ``reason`` is a bounded metric label."""

    reason: str
    message: str
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A ticket released to ``ticket.upstream`` at ``ticket.effective_priority``."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Preempt:
    """Pause ``ticket`` at its upstream: a more important request needs its slot. The slot is
    freed when the ticket is released; the request then comes back with :meth:`requeue`."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Expiry:
    """A ticket that left the queue without being sent: its deadline or budget ran out, or
    (``stage == "sla"``) it can no longer make its SLA and is refused."""

    ticket: Ticket
    stage: str


@dataclass(slots=True)
class Window:
    """One upstream's dispatch window.

    ``external`` is load on the upstream that is not ours: what it reports (running + waiting,
    scraped from its metrics) minus what we had in flight at that moment. Several gateways
    sharing one vLLM thus see each other's work. It must not include our own requests: the
    scraped count is up to a scrape interval old, and counting our finished requests in it
    would hold the window shut.

    With Redis (:mod:`gateway.leases`) the gateways split the window exactly instead: ``lease``
    is how many slots this gateway may fill (it dispatches only while it runs fewer) and
    ``shared`` how many the other gateways hold. ``lease`` is None without Redis, or while it
    is down. ``external`` then counts only what the leases do not explain (clients that are
    not gateways): the scrape takes ``inflight + shared`` as accounted for, and the latest
    reading counts, not the recent peak (:meth:`see_others`). Trusting the scraped peak for
    the other gateways too held a gateway out of slots the other had just given back for 2 s
    (the scrape's hold), and the two never ran side by side. ``owing``
    says the others are owed slots: then a slot this gateway frees goes back through Redis
    before it may be refilled (:meth:`freed` lowers the lease to what runs; the next sync
    answers with the new share). Refilling at once kept the slot in the others' eyes for as
    long as that sync took, seconds on a loaded host, and one gateway ran its share again
    while the other waited.
    ``overflow`` marks cold or extra capacity, used only when the primaries cannot keep a
    request's queue budget (:mod:`gateway.overflow`).
    """

    name: str
    size: int
    inflight: int = 0
    external: int = 0
    usable: bool = True
    lease: int | None = None
    shared: int = 0
    owing: bool = False
    overflow: bool = False

    @property
    def occupied(self) -> int:
        return self.inflight + self.shared + self.external

    def see_others(self, *, latest: int, peak: int) -> None:
        """Load other clients put on the upstream, from a scrape of it: ``latest`` reading's,
        or the ``peak`` of the recent ones (:mod:`gateway.scrape`). Without leases the peak:
        another gateway refilling a slot must not look like a free one. With leases the other
        gateways are counted exactly in ``shared``, and what the gauge shows beyond them is
        clients that are not gateways or the gauge lagging behind requests that just ended;
        held at its peak, that lag kept this gateway out of slots its lease gave it for
        seconds (a side-by-side test ran one gateway's whole backlog first)."""
        self.external = latest if self.lease is not None else peak

    def freed(self) -> None:
        """One of our requests here ended."""
        self.inflight -= 1
        if self.owing and self.lease is not None:
            self.lease = min(self.lease, self.inflight)

    def has_room(self, reserved: int) -> bool:
        return (
            self.usable
            and self.occupied < self.size - reserved
            and (self.lease is None or self.inflight < self.lease)
        )

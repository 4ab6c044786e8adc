"""Which upstream a ticket goes to, among the windows that have room for it.

Each task's system prompt is fixed, so a task's requests share a long prefix that vLLM's
prefix cache reuses, but only on the upstream that served the task before. ``affinity``
routing therefore sends a task to the same upstream while load allows; ``least-loaded`` picks
the window with the lowest occupancy, as the gateway did before (and as one upstream, or
identical requests, would want).

**Rendezvous (highest-random-weight) hashing.** Every (task, upstream) pair gets a weight
from a stable hash; a task's upstreams in descending weight are its *order*, and the first
one is its home. HRW rather than a hash ring: there are few upstreams (a handful of vLLM
servers), so scoring each of them per task is cheap and needs no ring or virtual nodes to
spread evenly, and when an upstream is added or removed only the tasks whose home it is (or
becomes) move, so the other upstreams keep their warm caches. The hash is blake2b over the
names, never Python's ``hash()``, which is salted per process: gateways behind one load
balancer, and a gateway after a restart, must agree on every task's home.

**Load guard.** Affinity must not pin a hot task to one upstream while another idles. The
ticket goes to the first upstream in its task's order whose occupancy (``occupied / size``)
is within :data:`SPILL_MARGIN` of the least-occupied candidate. Spilling to the *next in
hash order*, rather than straight to the least-loaded, keeps a task's overflow on one second
upstream, whose cache then warms for that task too; with two upstreams both are the same.

The key is the ticket's task name. A pipeline's label step is its label task's own step
(``sentiment``: same prompt, same key); its reply step carries the pipeline's name
(``assist``), and its prompt (the reply task's, plus the label sentence) is shared by the
pipeline's replies only, so the pipeline's own name is the right key for it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from typing import Literal, Protocol, TypeVar

RoutingMode = Literal["affinity", "least-loaded"]
ROUTING_MODES: tuple[RoutingMode, ...] = ("affinity", "least-loaded")

#: How much busier (occupancy ratio) a task's home may be than the least-occupied candidate
#: before its request spills on. A quarter of the window: every candidate already has room
#: and the adaptive window keeps each upstream at a load that meets the SLA, so being a
#: little busier costs some decode speed, while a cache miss re-reads a prompt of several
#: hundred tokens. On the CPU windows here (4-8 slots) that is one or two requests more than
#: the idlest upstream; a ratio (not a slot count) means the same on a GPU's 64-slot window
#: and between upstreams of different sizes.
SPILL_MARGIN = 0.25


class Load(Protocol):
    """What routing reads of a window (:class:`gateway.tickets.Window` is one): routing sits
    below the scheduler's vocabulary so that settings can name its modes."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def occupied(self) -> int: ...


W = TypeVar("W", bound=Load)


def weight(task: str, upstream: str) -> int:
    """The rendezvous weight of ``upstream`` for ``task``: stable across processes."""
    digest = blake2b(f"{task}\x00{upstream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hash_order(task: str, upstreams: Sequence[str]) -> tuple[str, ...]:
    """``upstreams`` in the task's preference order (highest weight first; name breaks a
    tie, which a 64-bit hash makes practically impossible but keeps the order total)."""
    return tuple(sorted(upstreams, key=lambda name: (-weight(task, name), name)))


def occupancy(window: Load) -> float:
    return window.occupied / window.size if window.size > 0 else 1.0


class Router:
    """The final pick among windows with room. Not thread-safe: the scheduler owns it.

    Usage::

        router = Router("affinity")
        window = router.choose("chat", fits, names=tuple(all_windows))

    ``names`` is every upstream the scheduler knows (not only those with room): a task's
    order is computed once per set of names and cached, because :meth:`choose` runs on every
    dispatch; the cache is dropped when the set changes.
    """

    def __init__(self, mode: RoutingMode = "affinity", margin: float = SPILL_MARGIN) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {mode!r}")
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"the spill margin is an occupancy ratio in [0, 1], got {margin}")
        self.mode: RoutingMode = mode
        self.margin = margin
        self._names: tuple[str, ...] = ()
        self._orders: dict[str, tuple[str, ...]] = {}

    def order(self, task: str, names: tuple[str, ...]) -> tuple[str, ...]:
        """The task's hash order over ``names`` (cached per set of names)."""
        if names != self._names:
            self._names, self._orders = names, {}
        found = self._orders.get(task)
        if found is None:
            found = self._orders[task] = hash_order(task, names)
        return found

    def choose(self, task: str, fits: Sequence[W], names: tuple[str, ...]) -> W | None:
        """The window for a ticket of ``task`` among ``fits`` (those with room), or None."""
        if not fits:
            return None
        least = min(fits, key=occupancy)  # the first of equals: the configured order
        if self.mode == "least-loaded" or len(fits) == 1:
            return least
        limit = occupancy(least) + self.margin + 1e-9  # "exactly at the margin" stays home
        by_name = {w.name: w for w in fits}
        for name in self.order(task, names):
            window = by_name.get(name)
            if window is not None and occupancy(window) <= limit:
                return window
        return least  # a window outside ``names``: the caller passed a stale set

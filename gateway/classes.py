"""Priority classes and how a request's priority becomes vLLM's ``priority`` field.

People think "higher is more important"; vLLM runs LOWER values first. Everything in the
gateway (config, headers, logs) uses the human scale, and :func:`to_vllm_priority` is the one
place that flips the sign.

The human scale is measured in seconds of head start. A class's ``head_start_s`` is how far
ahead in the queue a request of that class starts, and every second a request waits adds one
point. So a ``batch`` request (head start 10) that has waited 91 s outranks a ``realtime``
request (head start 100) that just arrived: aging is a bounded head start, and no class can
starve another for longer than the gap between their head starts.

The other side of that bound: under *sustained* overload, work that has aged past the class
above it takes that class's slots, so aging alone would turn overload into first come, first
served. ``max_wait_s`` closes the door instead: while more important work is waiting, a class
whose oldest request has already waited ``max_wait_s`` admits no more (429 with Retry-After),
and what it has admitted is still served by aging. See :meth:`Scheduler.admit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Class names, most important first. The order is part of the public contract.
CLASS_NAMES: tuple[str, ...] = ("realtime", "interactive", "standard", "batch", "background")


@dataclass(frozen=True, slots=True)
class ClassPolicy:
    """How one priority class is queued and dispatched.

    ``rank`` 0 is the most important class. ``reserve`` is the fraction of each upstream's
    dispatch window this class must leave free for more important classes (its headroom).
    ``max_queued`` bounds how many requests of this class may wait in the gateway.
    ``max_wait_s`` is how far behind the class may fall while more important work waits
    before it admits no more (by default the gap to the class above: the age at which its
    requests would start to outrank that class's fresh ones). ``max_preemptions`` is how many
    times one request of the class may be paused for more important work and resumed later
    (0: never paused); it bounds what preemption can add to the class's wait.
    """

    name: str
    rank: int
    head_start_s: float
    reserve: float
    max_queued: int
    max_wait_s: float = math.inf
    max_preemptions: int = 0

    def reserved_slots(self, window: int) -> int:
        """Slots of a ``window``-wide upstream this class may not use.

        Rounded up so a small window still keeps headroom, but never the whole window: a
        class that could use no slot at all would starve.
        """
        return min(math.ceil(self.reserve * window - 1e-9), max(window - 1, 0))


#: The head starts follow the classes' SLAs: a class's gap to realtime bounds its wait for a
#: first token, and giving a class a tighter bound than its SLA needs only takes slots from
#: the classes above. Batch (first token within 120 s) may wait 90 s behind realtime; with a
#: 30 s gap its aged requests took the slots realtime needed at 2x load, and closing its door
#: at 10 s to prevent that refused batch work vLLM's static priority finished in time.
DEFAULT_POLICIES: tuple[ClassPolicy, ...] = (
    ClassPolicy("realtime", 0, head_start_s=100.0, reserve=0.0, max_queued=64),
    ClassPolicy("interactive", 1, head_start_s=90.0, reserve=0.1, max_queued=64, max_wait_s=10),
    ClassPolicy(
        "standard", 2, head_start_s=80.0, reserve=0.2, max_queued=128, max_wait_s=10,
        max_preemptions=2,
    ),
    ClassPolicy(
        "batch", 3, head_start_s=10.0, reserve=0.3, max_queued=256, max_wait_s=70,
        max_preemptions=4,
    ),
    ClassPolicy(
        "background", 4, head_start_s=0.0, reserve=0.4, max_queued=256, max_wait_s=10,
        max_preemptions=8,
    ),
)  # fmt: skip


class ClassTable:
    """The configured classes, looked up by name, in rank order."""

    def __init__(self, policies: Iterable[ClassPolicy]) -> None:
        ordered = sorted(policies, key=lambda p: p.rank)
        self._by_name: Mapping[str, ClassPolicy] = {p.name: p for p in ordered}
        self.ordered: tuple[ClassPolicy, ...] = tuple(ordered)
        self.top_head_start_s = max(p.head_start_s for p in ordered)

    def __getitem__(self, name: str) -> ClassPolicy:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def lowered(self, base: ClassPolicy, requested: str | None) -> ClassPolicy:
        """The class a request runs at when its caller asks for ``requested``.

        A caller may lower its request's class, never raise it: asking for a more important
        class than the task's silently keeps the task's class. Unknown names raise KeyError.
        """
        if requested is None:
            return base
        wanted = self._by_name[requested]
        return wanted if wanted.rank > base.rank else base


def effective_priority(policy: ClassPolicy, waited_s: float) -> float:
    """Human-scale priority after waiting ``waited_s`` seconds (higher is more important)."""
    return policy.head_start_s + max(waited_s, 0.0)


def to_vllm_priority(effective: float) -> int:
    """vLLM's ``priority`` field for a human-scale priority: vLLM serves LOWER values first."""
    return -round(effective)

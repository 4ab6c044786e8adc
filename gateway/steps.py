"""A task step and its results: what serving is asked to run, and what it gives back.

Plain values: the routes build a :class:`Step` from a client's request, serving returns an
:class:`Answer` or a :class:`Stream`, and the HTTP glue turns that into a response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway.classes import ClassPolicy
from gateway.config import Task
from gateway.errors import BadRequest
from gateway.protocol import ClientRequest


@dataclass(frozen=True, slots=True)
class Budget:
    """Seconds from arrival: until dispatch at the latest, and until the last byte."""

    queue_s: float
    total_s: float

    @classmethod
    def for_task(cls, task: Task, header: str | None) -> Budget:
        """The task's deadlines, tightened (never loosened) by ``X-Request-Deadline-Ms``."""
        if header is None:
            return cls(task.queue_deadline_s, task.deadline_s)
        try:
            # A budget beyond the task's deadline changes nothing; clamping keeps absurdly long
            # numbers from overflowing the float division below.
            ms = min(int(header), 10**12)
        except ValueError:
            ms = 0
        if ms <= 0:
            raise BadRequest(
                "X-Request-Deadline-Ms must be a positive integer (milliseconds from arrival)",
                param="X-Request-Deadline-Ms",
                code="invalid_value",
            )
        return cls(min(task.queue_deadline_s, ms / 1000), min(task.deadline_s, ms / 1000))

    def within(self, other: Budget) -> Budget:
        return Budget(min(self.queue_s, other.queue_s), min(self.total_s, other.total_s))


@dataclass(slots=True)
class Step:
    """One upstream call for a task: what to send, at which class, for which tenant."""

    task: Task
    policy: ClassPolicy
    request: ClientRequest
    budget: Budget
    tenant: str = ""  # for fairness between tenants inside a class
    extra_system: str | None = None
    queued_at: float | None = None  # when this step joined the queue, if not at arrival


@dataclass(slots=True)
class Answer:
    """A whole answer (the JSON object), with the response headers the step set."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Stream:
    """A started stream: its events (ending with ``[DONE]`` whatever happens) and headers."""

    events: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)

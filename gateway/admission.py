"""Admission policies applied before a step is queued: shorter answers under a long queue,
and refusing at once what could not make its deadline.
"""

from __future__ import annotations

from gateway.errors import RateLimited
from gateway.estimates import Estimates
from gateway.exchange import Exchange
from gateway.metrics import Metrics
from gateway.protocol import granted_max_tokens
from gateway.scheduler import Scheduler
from gateway.steps import Step

#: Completions within the rate's horizon before a prediction may refuse anyone: right after a
#: start (or a quiet spell) one or two completions make the rate look far too slow while a
#: full window is still warming up, and a refusal on that would turn away servable work.
MIN_EVIDENCE = 10
#: The queue-wait prediction is a mean (queued requests ahead over the recent completion
#: rate of a mix whose answers run from 1 to 500 tokens), and a slot often frees far sooner:
#: refuse only when half the predicted wait already misses. Measured on the SLO benchmark at
#: 2x capacity with the full prediction: 38 of 40 realtime requests refused at the door met
#: their SLA when the same trace went to vLLM alone. A refused request is a sure miss; a
#: queued one that turns out late costs a short wait (a queue deadline expires it unsent).
WAIT_DOUBT = 2.0


def degrade(
    scheduler: Scheduler,
    metrics: Metrics,
    ex: Exchange,
    step: Step,
    headers: dict[str, str],
    now: float,
) -> int:
    """The max_tokens to grant, capped by the task's degrade policy when the queue is long."""
    granted = granted_max_tokens(step.task, step.request)
    policy = step.task.degrade
    if policy is None or granted <= policy.max_tokens or step.request.structured:
        # A cut tool call or JSON answer is no answer: those keep their max_tokens (and are
        # refused with 429 when they cannot be on time, like any other request).
        return granted
    wait = scheduler.predicted_wait(step.policy, now)
    if wait <= policy.when_wait_s:
        return granted
    ex.degraded = True
    metrics.degraded.labels(step.task.name).inc()
    headers["X-Degraded"] = f"max_tokens={policy.max_tokens}"
    return policy.max_tokens


def refuse_if_late(
    scheduler: Scheduler,
    seen: Estimates,
    metrics: Metrics,
    ex: Exchange,
    step: Step,
    max_tokens: int,
    now: float,
) -> None:
    """Refuse now (429 + Retry-After) what would finish past its deadline by what this
    gateway has seen, rather than queue it to fail late and spend capacity on-time work
    needed."""
    pclass = step.policy.name
    if scheduler.completions.samples(now) < MIN_EVIDENCE:
        return
    wait = scheduler.predicted_wait(step.policy, now) / WAIT_DOUBT
    if wait <= 0:
        return
    service = seen.service_s(step.task.name, max_tokens)
    # Only a request that would run and still miss its deadline burns capacity: one that
    # waits past its queue deadline expires unsent, so refusing it early saves nothing, and
    # the prediction was wrong for most of them (at 2x capacity, 24 of 24 sentiment
    # requests refused for their 2 s queue deadline met their SLA with vLLM alone).
    total_left = ex.arrival + step.budget.total_s - now
    if wait + service <= total_left:
        return
    metrics.rejections.labels(pclass, "deadline_unreachable").inc()
    retry = scheduler.retry_after(step.policy, now)
    raise RateLimited(
        f"the request would not finish within its deadline ({total_left:.1f} s left): "
        f"about {wait:.1f} s of queue ahead of it and {service:.1f} s of service; "
        f"retry after {retry} s",
        code="deadline_unreachable",
        retry_after_s=retry,
    )

"""Graceful shutdown: take no new work, let started work finish, then cut what is left.

    SIGTERM ─▶ draining     the listening socket closes (new connections are refused, so
                            health probes fail); queued requests (not yet sent to an
                            upstream) and any new one on an open connection: 503
                            ``shutting_down`` at once
            ─▶ grace period requests already at an upstream run on, streams included
            ─▶ grace over   the rest are cut: a 503 if their answer has not started, an
                            in-band error event and ``[DONE]`` if it has. Cutting closes their
                            upstream connections, so vLLM aborts them.

A queued request is answered rather than started because starting it could only make it the
next thing to cut; a 503 with ``Retry-After`` sends it to another gateway at once (OpenAI
clients retry 503 by themselves).

The server calls :meth:`Drain.begin` when it stops listening (see ``gateway.__main__``); the
request shell runs each request inside :meth:`Drain.watch` and wraps each stream with
:meth:`Drain.stream`. Cutting is a task cancellation turned into :class:`ShuttingDown`, the
same way ``routes._cancel_on_disconnect`` turns a client's disconnect into ``ClientGone``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway import sse
from gateway.errors import ServiceUnavailable


class ShuttingDown(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__(
            "the gateway is shutting down; retry the request",
            code="shutting_down",
            headers={"Retry-After": "1", "Connection": "close"},
        )


@dataclass(eq=False, slots=True)
class _Watched:
    task: asyncio.Task[Any]
    started: Callable[[], bool]  # has it reached an upstream (so it may use the grace period)?
    cut: bool = False
    interruptible: bool = True  # False while a stream's event is being written to the client

    def interrupt(self) -> None:
        self.cut = True
        if self.interruptible:
            self.task.cancel()


class Drain:
    """One app's shutdown state. ``Drain(grace_s=30.0)``; build it anywhere, use it in the loop."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._watched: set[_Watched] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """Stop taking work: answer what has not started, and cut the rest after the grace."""
        if self.draining:
            return
        self.draining = True
        for watched in list(self._watched):
            if not watched.started():
                watched.interrupt()
        self._timer = asyncio.get_running_loop().call_later(self.grace_s, self.end_grace)

    def end_grace(self) -> None:
        for watched in list(self._watched):
            watched.interrupt()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @contextmanager
    def watch(self, started: Callable[[], bool]) -> Iterator[None]:
        """Run the enclosed part of a request so that a shutdown can cut it (ShuttingDown)."""
        if self.draining:
            raise ShuttingDown()
        task = asyncio.current_task()
        assert task is not None
        watched = _Watched(task, started)
        self._watched.add(watched)
        try:
            yield
        except asyncio.CancelledError:
            if watched.cut and task.uncancel() == 0:
                raise ShuttingDown() from None
            raise
        finally:
            self._watched.discard(watched)

    async def stream(
        self, events: AsyncIterable[Any], on_cut: Callable[[ShuttingDown], None] | None = None
    ) -> AsyncIterator[Any]:
        """A stream's events; if the grace period ends first, an in-band error and ``[DONE]``
        (and ``on_cut`` is told, so the request is recorded as cut).

        The cut lands only while the stream waits for its upstream, never in the middle of
        writing an event to the client; a stream cut while writing ends before its next event.
        """
        task = asyncio.current_task()
        assert task is not None
        upstream = aiter(events)
        watched = _Watched(task, lambda: True)
        self._watched.add(watched)
        last: Any = None
        try:
            while not watched.cut or _is_done(last):  # a stream that said [DONE] is complete
                try:
                    event = await anext(upstream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if watched.cut and task.uncancel() == 0:
                        break
                    raise
                watched.interruptible = False
                yield event
                watched.interruptible = True
                last = event
        finally:
            self._watched.discard(watched)
            if isinstance(upstream, AsyncGenerator):
                await upstream.aclose()  # the relay's cleanup: upstream closed, slot freed, logged
        cut = ShuttingDown()
        if on_cut is not None:
            on_cut(cut)
        yield sse.error_event(cut)
        yield sse.DONE


def _is_done(event: Any) -> bool:
    return isinstance(event, bytes) and sse.is_done(event)

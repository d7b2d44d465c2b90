"""Single-flight: concurrent calls for the same key share one execution of the work.

The shared work must not belong to the caller that happened to start it: if that caller is
cancelled (its client went away, a timeout fired, the server is shutting down), the others still
need the result. The work therefore runs in a task of its own, and every caller, the first one
included, awaits it through ``asyncio.shield``: cancelling a caller cancels only its wait. The
work must be bounded by its own deadline. Every waiter gets the work's result or its exception.
A flight belongs to the event loop it started in: a caller in another loop starts its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Task[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return self.joinable(key) is not None

    def joinable(self, key: Hashable) -> asyncio.Task[T] | None:
        """The flight under way for ``key`` in this loop, if any (await it shielded)."""
        task = self._flights.get(key)
        return task if task is not None and _joinable(task) else None

    def start(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The flight for ``key``: the one under way, or ``work()`` started now."""
        task = self._flights.get(key)
        if task is None or not _joinable(task):
            task = asyncio.get_running_loop().create_task(work())
            self._flights[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        return task

    async def run(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Join or start the flight for ``key`` and wait for its outcome."""
        return await asyncio.shield(self.start(key, work))

    def _landed(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone, and that is fine


def _joinable(task: asyncio.Task[Any]) -> bool:
    # A task of another loop cannot be awaited in this one, and may never land: its loop may
    # have ended with it under way.
    return task.get_loop() is asyncio.get_running_loop()

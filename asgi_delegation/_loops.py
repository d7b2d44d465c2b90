"""State that belongs to one event loop, kept by objects that outlive loops.

Tasks, futures, pooled connections and anyio's limiters are bound to the event loop that made
or first used them. A middleware is not: one instance can serve from several loops, one after
another (``asyncio.run()`` called twice, a test suite, Starlette's TestClient, which runs each
``with`` block in a loop of its own) or at once (loops in threads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")


class PerLoop(Generic[T]):
    """A ``T`` for each event loop, made on first use in that loop."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        # A loop adds and removes only its own entry (and closed loops', which none adds
        # again): loops in different threads need no lock.
        self._values: dict[asyncio.AbstractEventLoop, T] = {}

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            # Nothing runs in a closed loop again: what was made for one can go.
            for closed in [other for other in list(self._values) if other.is_closed()]:
                self._values.pop(closed, None)
            value = self._values[loop] = self._make()
        return value

    def pop(self) -> T | None:
        """Forget the running loop's ``T``: the next :meth:`get` in this loop makes a new one."""
        return self._values.pop(asyncio.get_running_loop(), None)


class Slot:
    """``async with Slot(limiter)``: one of ``limiter``'s tokens, for one request. A free one is
    taken without yielding to the event loop: anyio's ``acquire()`` checkpoints twice even then,
    two loop iterations on every request to the authorization server."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter

    async def __aenter__(self) -> None:
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            await self._limiter.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``, whichever loop (and thread) it runs in."""
    loop = task.get_loop()
    if task.done() or loop.is_closed():
        return  # a task of a closed loop never runs again
    if loop is asyncio.get_running_loop():
        task.cancel()
    else:
        with suppress(RuntimeError):  # its loop closed in the meantime
            loop.call_soon_threadsafe(task.cancel)

"""Single-flight: concurrent calls for the same key share one execution of the work.

The shared work must not belong to the caller that happened to start it: if that caller is
cancelled (its client went away), the others still need the result. The leader therefore runs
the work in a shielded cancel scope; the work itself must be bounded by its own deadline, so a
cancelled leader lingers at most that long. Waiters can be cancelled freely. Every waiter gets the
leader's result or the leader's exception.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
        else:
            flight = self._flights[key] = _Flight()
            try:
                with anyio.CancelScope(shield=True):
                    flight.result = await work()
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                del self._flights[key]
                flight.done.set()
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]

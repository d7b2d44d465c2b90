"""A document fetched on demand, kept while fresh, refetched one fetch at a time.

Used for the issuer's metadata and its JWKS. A failed fetch keeps the last good value and
backs off exponentially, so an authorization server that is down is not hammered by every
request; callers that have no value at all get :class:`Unavailable` with a retry delay.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from . import _clock
from ._fetch import FetchError
from ._singleflight import SingleFlight

T = TypeVar("T")

logger = logging.getLogger("asgi_delegation")

_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0


class Unavailable(Exception):
    """No usable value, and fetching one failed; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the authorization server is unavailable")
        self.retry_after = max(1, math.ceil(retry_after))


class Refreshing(Generic[T]):
    """``load()`` returns the value and how many seconds it stays fresh."""

    def __init__(self, name: str, load: Callable[[], Awaitable[tuple[T, float]]]) -> None:
        self._name = name
        self._load = load
        self._flight: SingleFlight[T] = SingleFlight()
        self.value: T | None = None
        self.loaded_at = -math.inf
        self._fresh_until = -math.inf
        self._retry_at = -math.inf
        self._backoff = _FIRST_BACKOFF

    @property
    def refreshing(self) -> bool:
        return self._flight.in_flight(None)

    async def get(self, *, force: bool = False) -> T:
        now = _clock.monotonic()
        if self.value is not None and not force and now < self._fresh_until:
            return self.value
        if now < self._retry_at and not self.refreshing:
            if self.value is not None:
                return self.value
            raise Unavailable(self._retry_at - now)
        return await self._flight.run(None, self._refresh)

    async def _refresh(self) -> T:
        try:
            value, ttl = await self._load()
        except FetchError as exc:
            backoff = self._backoff
            self._retry_at = _clock.monotonic() + backoff
            logger.warning(
                "fetching the %s failed, next attempt in %.0f s: %s", self._name, backoff, exc
            )
            self._backoff = min(backoff * 2, _MAX_BACKOFF)
            if self.value is not None:
                return self.value
            # The backoff itself, not retry_at - now: that float difference can exceed it by an
            # ulp, and ceil() would then announce one second more.
            raise Unavailable(backoff) from None
        now = _clock.monotonic()
        self.value, self.loaded_at = value, now
        self._fresh_until = now + ttl
        self._retry_at, self._backoff = -math.inf, _FIRST_BACKOFF
        return value

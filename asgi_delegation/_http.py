"""The HTTP client the middleware talks to the authorization server with, per event loop.

A pooled connection belongs to the event loop that opened it: used from another loop it fails
(``RuntimeError('Event loop is closed')`` once the first loop has ended). The client the
middleware makes for itself is therefore made per loop, on first use in it, and made again
after :meth:`HTTPClient.aclose` (lifespan shutdown), so any number of lifespan cycles work. A
loop that ends through ``asyncio.run``, ``asyncio.Runner`` or ``anyio.run`` closes its client
on the way out. A client the application passes as ``http_client`` is used as is, in every
loop, and never closed here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import suppress
from functools import partial
from typing import NamedTuple

import httpx

from ._loops import PerLoop


class _Owned(NamedTuple):
    client: httpx.AsyncClient
    closer: AsyncGenerator[None, None]


async def _closing(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await client.aclose()


class HTTPClient:
    """Hands out the client for the running event loop: ``given``, or one made here."""

    def __init__(self, given: httpx.AsyncClient | None, *, timeout: float) -> None:
        self._given = given
        self._owned: PerLoop[_Owned] = PerLoop(self._open)
        self._unused: list[httpx.AsyncClient] = []
        if given is None:
            # The CA bundle is loaded once (it takes about 50 ms), and the first client is
            # made now: a bad bundle or proxy variable fails the constructor, not a request.
            self._make = partial(
                httpx.AsyncClient,
                verify=httpx.create_ssl_context(),
                follow_redirects=False,
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            )
            self._unused.append(self._make())

    def get(self) -> httpx.AsyncClient:
        """The client to use in the running event loop."""
        if self._given is not None:
            return self._given
        return self._owned.get().client

    async def aclose(self) -> None:
        """Close the running loop's own client; the next :meth:`get` makes another."""
        owned = self._owned.pop()
        if owned is not None:
            await owned.closer.aclose()

    def _open(self) -> _Owned:
        try:
            client = self._unused.pop()  # atomic: two loops cannot both take it
        except IndexError:
            client = self._make()
        closer = _closing(client)
        # Its first step awaits nothing, so it runs to its yield right here, in the running
        # loop, which from then on finalizes it (and closes the client) before it closes.
        with suppress(StopIteration):
            closer.asend(None).send(None)
        return _Owned(client, closer)

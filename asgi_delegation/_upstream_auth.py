"""An httpx.Auth that calls an upstream API with a delegated grant."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator

import httpx

from ._grant import Grant


class UpstreamAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <grant>``; on a 401 it forgets that grant and retries once
    with a fresh one (the upstream API may have revoked it before its expiry)."""

    def __init__(
        self,
        resource: str,
        exchange: Callable[[], Awaitable[Grant]],
        forget: Callable[[Grant], Awaitable[None]],
    ) -> None:
        self._resource = resource
        self._exchange = exchange
        self._forget = forget

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("delegated grants are obtained asynchronously: use httpx.AsyncClient")
        yield request  # pragma: no cover - makes this a generator, as httpx expects

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        grant = await self._exchange()
        request.headers["Authorization"] = f"Bearer {grant.access_token}"
        response = yield request
        if response.status_code == 401:
            await self._forget(grant)
            grant = await self._exchange()
            request.headers["Authorization"] = f"Bearer {grant.access_token}"
            yield request

    def __repr__(self) -> str:
        return f"UpstreamAuth(resource={self._resource!r})"
